"""The project's own benchmarks, one folder per stage; run by ``fedsound bench STAGE`` from a source checkout."""
