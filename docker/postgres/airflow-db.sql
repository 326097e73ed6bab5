-- Airflow's metadata database, beside MLflow's (POSTGRES_DB), owned by the same user.
CREATE DATABASE airflow;
