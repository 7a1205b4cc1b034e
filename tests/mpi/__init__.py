"""Scripts that tests launch under mpiexec (each rank runs one)."""
