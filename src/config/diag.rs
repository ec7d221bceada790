//! Located configuration problems: `file:line:col: message`.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem found in a configuration or unit file.
///
/// `line` and `col` are 1-based; a problem without a location (missing file, bad file name)
/// is reported at 1:1. `col` counts characters, not bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// File the problem is in (or the directory, for directory-level problems).
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub col: usize,
    /// Lower-case, plain-words description naming the key or field.
    pub message: String,
}

impl Diagnostic {
    /// A diagnostic at `line:col` of `file`.
    pub fn new(file: &Path, line: usize, col: usize, message: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            line,
            col,
            message: message.into(),
        }
    }

    /// A diagnostic without a location (reported at 1:1).
    pub fn at_file(file: &Path, message: impl Into<String>) -> Self {
        Self::new(file, 1, 1, message)
    }

    /// A diagnostic at byte offset `offset` of `text` (clamped to the text).
    pub fn at_offset(file: &Path, text: &str, offset: usize, message: impl Into<String>) -> Self {
        let (line, col) = line_col(text, offset);
        Self::new(file, line, col, message)
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

/// 1-based `(line, column)` of byte `offset` in `text`; the column counts characters.
/// Offsets past the end or inside a multi-byte character are moved back to a valid position.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Lower-case description of an I/O error without the `(os error N)` suffix.
pub fn io_message(err: &std::io::Error) -> String {
    let text = err.to_string();
    let text = match text.find(" (os error") {
        Some(i) => &text[..i],
        None => text.as_str(),
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_file_line_col_message() {
        let d = Diagnostic::new(Path::new("/etc/tau/tau.toml"), 3, 7, "unknown key `x`");
        assert_eq!(d.to_string(), "/etc/tau/tau.toml:3:7: unknown key `x`");
        assert_eq!(
            Diagnostic::at_file(Path::new("a"), "m").to_string(),
            "a:1:1: m"
        );
    }

    #[test]
    fn line_col_counts_lines_and_chars() {
        let text = "ab\ncdé f\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 2), (1, 3));
        assert_eq!(line_col(text, 3), (2, 1));
        // "é" is two bytes: byte 7 is 'f'... after "cdé " (c=3,d=4,é=5..7,space=7)
        assert_eq!(line_col(text, 8), (2, 5));
        assert_eq!(line_col(text, 6), (2, 3)); // inside 'é': moved back
        assert_eq!(line_col(text, 1000), (3, 1));
    }

    #[test]
    fn io_message_is_plain() {
        let err = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(io_message(&err), "no such file or directory");
    }
}
