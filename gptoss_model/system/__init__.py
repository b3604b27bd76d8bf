"""Process and file plumbing shared by every concern: child processes, worker spreading, memory,
foreign file names and locks, safe unpickling."""
