"""Near-future guidance: the cache of guide trajectories and how it enters a group."""
