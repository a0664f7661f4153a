"""Format + storage, framework-free: locate and read a checkpoint verified, audit it."""
