"""Scripts that prepare what the project needs (a real checkpoint) but are not part of it at run time."""
