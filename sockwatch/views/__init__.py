"""What users see: tables, traces, the latency report and ``sockwatch top``."""

# The views of ``sockwatch top``, here so that the command line can offer them
# without importing the screen code.
TOP_VIEWS = ("processes", "connections", "listeners", "latency")
