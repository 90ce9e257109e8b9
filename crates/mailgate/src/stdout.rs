//! Writing to standard output, where a reader that went away is a normal end (see the
//! `println!` macro in main.rs).

use std::io::Write;

/// Writes to standard output (see `println!` above).
pub(crate) fn write(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args) {
        closed(&e);
    }
}

/// Writes bytes as they are (`captured show --raw`).
pub(crate) fn write_bytes(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(bytes) {
        closed(&e);
    }
}

/// Flushes what is buffered (a last line without a newline).
pub(crate) fn flush() {
    if let Err(e) = std::io::stdout().lock().flush() {
        closed(&e);
    }
}

/// The reader closed the pipe: the command ends normally (nothing more can be said, and
/// the work asked for is done or not needed). Any other write error is one.
fn closed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("mailgate: cannot write to standard output: {e}");
    std::process::exit(1);
}
