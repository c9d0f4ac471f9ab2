"""`din demo`: the whole system end to end on a private Redis (`demo.pipeline`)."""
