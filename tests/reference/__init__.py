"""Independent reference implementations of the Spark jobs, in DuckDB SQL and NumPy, used by tests and the benchmark."""
