"""Runtime shared by every lmesh service: bootstrap, Consul, telemetry, errors, health, config."""
