"""Every byte that reaches a file system: POSIX file I/O, hashing and the atomic commit.

Nothing outside this package calls ``dir_fd``, ``renameat2``, ``flock``, ``O_NOFOLLOW`` or
``scandir``.
"""
