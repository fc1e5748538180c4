"""What every stage shares: spec, distributed state, engine, data, checkpoints, export, signals, records, the loop."""
