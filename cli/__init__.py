"""`gs`: the command line of the Gradient Starvation service (train, audit, jobs, report, compare)."""
