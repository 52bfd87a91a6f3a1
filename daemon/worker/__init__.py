"""Workers: claim jobs from the shared queue, run their handler, commit the effect."""
