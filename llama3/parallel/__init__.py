"""Running one model over several processes: tensor parallelism (`tp`) and the sliced checkpoint reads it needs."""
