"""ray-influence: multi-stage influence functions with EK-FAC, as a distributed job on Ray."""

__version__ = "0.1.0"
