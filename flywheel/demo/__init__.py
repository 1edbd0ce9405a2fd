"""The demo: plan, stages, terminal UI and report of `flywheel demo`."""
