"""infra: the embedded local stack (Kafka KRaft broker, MLflow server, Airflow standalone) and the topics."""
