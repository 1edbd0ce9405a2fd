"""The pyfunc entry point MLflow stores with every drafter model ("models from code": no pickled object in
the model, so loading one runs only this file and the project's own code). See ``trainer.drafter_model``."""

import mlflow.models

from trainer.drafter_model import DrafterModel

mlflow.models.set_model(DrafterModel())
