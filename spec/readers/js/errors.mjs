// The error classes of spec/FORMAT.md ("Errors"), named as safeckpt names them.

export class CheckpointError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}

/** A checkpoint, or a file its manifest lists, does not exist. */
export class CheckpointNotFoundError extends CheckpointError {}

/** A file failed verification or parsing: wrong size or hash, truncated, malformed. */
export class CheckpointCorruptedError extends CheckpointError {}

/** The manifest declares another format, or a major version this reader does not implement. */
export class UnsupportedFormatError extends CheckpointCorruptedError {}
