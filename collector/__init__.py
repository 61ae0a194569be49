"""collector: fleet telemetry ingest (MQTT -> SQLite/PostgreSQL). Not built yet; see issue 3."""
