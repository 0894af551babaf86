"""Background loops started from create_app: the audit sequencer (more to come)."""
