"""Fleet telemetry: the MQTT protocol, the disk outbox, and the reporting client.

Importing this package loads neither paho-mqtt nor sqlite3 state; the client does that
when it starts, so a runtime without telemetry pays nothing.
"""
