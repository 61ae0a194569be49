"""collector: fleet telemetry ingest (MQTT -> SQLite or PostgreSQL), HTTP API and fleet page."""
