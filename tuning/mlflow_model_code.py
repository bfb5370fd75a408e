"""MLflow "model from code" entry point of the SSVP heads model (see tuning/mlflow_model.py)."""
import mlflow

from tuning.mlflow_model import SSVPHeadsModel

mlflow.models.set_model(SSVPHeadsModel())
