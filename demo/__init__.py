"""`make demo`: the project's main job, run for real on this machine."""
