"""The SSVP heads of a sweep as an MLflow model (``pyfunc`` flavour, "models from code").

:func:`log_heads_model` logs the heads checkpoint of the ``role=refit`` run as an MLflow 3
*LoggedModel* named ``model`` (``mlflow.pyfunc.log_model``: this file as the model code, the
heads checkpoint and its ``config.json`` as artifacts, a signature and an input example), so
it is in the experiment's Models tab, the run's outputs and, with ``register_model``
(``sweep.py --register-model NAME``, ``mlflow: register_model: NAME``), the model registry::

    model = mlflow.pyfunc.load_model("models:/ssvp-heads/1")   # or models:/<model id> (the summary prints it)
    model.predict(pandas.DataFrame({"path": ["a.png"], "class_name": ["bottle"]}))   # -> score column

:func:`save_heads_model` writes the same model as a plain folder (no tracking store).

No pickle is written: the model class is this file's code (``set_model``), the weights are
the engine's own checkpoint (loaded ``weights_only``). The backbones are rebuilt from the
stored config (their weights come from where the config says, as for ``ssvp predict``).
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

__all__ = ["SSVPHeadsModel", "save_heads_model", "log_heads_model"]

HEADS = "heads"


class SSVPHeadsModel(mlflow.pyfunc.PythonModel):
    """Image paths (+ class names) -> image-level anomaly scores with the logged heads."""

    def load_context(self, context):
        from ssvp import engine

        self.checkpoint = context.artifacts[HEADS]
        self.cfg = engine.config_from_checkpoint(self.checkpoint).override({"device": "auto"})
        self.model = engine.build_model(self.cfg, engine.resolve_device(self.cfg.train.device))
        engine.load_head(self.model, self.checkpoint)

    # a DataFrame hint: MLflow infers no schema from it (the input is a table of image paths) and
    # does not warn at class definition that predict() has no type hints
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from ssvp import engine

        frame = pd.DataFrame(model_input)
        classes = frame["class_name"] if "class_name" in frame else ["object"] * len(frame)
        scores = []
        for path, cls in zip(frame["path"], classes):
            (res,) = engine.predict_paths(self.cfg, None, [Path(path)], str(cls), model=self.model)
            scores.append(res["score"])
        return pd.DataFrame({"path": list(frame["path"]), "score": scores})


def save_heads_model(heads: str | Path, dest: str | Path) -> Path:
    """Write the MLflow model folder of the heads checkpoint ``heads`` (``head.pt`` + ``config.json``)."""
    import mlflow

    heads, dest = Path(heads), Path(dest)
    with warnings.catch_warnings(), _no_progress_bar():
        warnings.simplefilter("ignore", UserWarning)  # save-time advice (pip requirements, signature)
        mlflow.pyfunc.save_model(path=str(dest), **_model_args(heads))
    return dest


def log_heads_model(heads: str | Path, tracking_uri: str, run_id: str, register_as: str | None = None,
                    example_image: str | None = None):
    """Log the heads checkpoint ``heads`` as the LoggedModel ``model`` of run ``run_id`` (in the store
    ``tracking_uri``), registered as ``register_as`` when given; MLflow's ``ModelInfo``.

    ``example_image`` (an image path the logging process can read) becomes the input example,
    which MLflow scores once at log time (the model is loaded: its backbones are built here);
    without one the model has its signature only."""
    from mlflow import MlflowClient
    from mlflow.models import Model
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    example = None
    if example_image and Path(example_image).is_file():
        example = pd.DataFrame({"path": [str(example_image)], "class_name": ["object"]})
    # the LoggedModel goes to the run's experiment (MLflow takes the process's current one otherwise)
    with warnings.catch_warnings(), _no_progress_bar(), _use_tracking_uri(tracking_uri), \
            _env("MLFLOW_EXPERIMENT_ID", experiment_id):
        warnings.simplefilter("ignore", UserWarning)
        return Model.log(artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run_id,
                         registered_model_name=register_as or None, input_example=example,
                         **_model_args(Path(heads)))


def _no_progress_bar():
    return _env("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@contextlib.contextmanager
def _env(key: str, value: str):
    """``os.environ[key] = value`` for the block, then as it was."""
    saved = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


def _signature():
    """Input: image paths (+ optional class names); output: the paths with their image scores."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "path"), ColSpec("string", "class_name", required=False)]),
        outputs=Schema([ColSpec("string", "path"), ColSpec("double", "score")]),
    )


def _model_args(heads: Path) -> dict:
    """What the saved and the logged model share: code, artifacts, signature, requirements, metadata."""
    import mlflow

    config = json.loads((heads / "config.json").read_text()) if (heads / "config.json").is_file() else {}
    return dict(
        signature=_signature(),
        python_model=str(Path(__file__).resolve().with_name("mlflow_model_code.py")),
        artifacts={HEADS: str(heads)},
        pip_requirements=["ssvp-platform", f"mlflow=={mlflow.__version__}"],
        metadata={"ssvp_config": config, "task": "zero-shot anomaly detection (image score)"},
    )
