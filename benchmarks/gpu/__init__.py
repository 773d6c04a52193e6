"""GPU benchmarks and checks; run them all with ``python -m benchmarks.gpu`` (see ``__main__``)."""
