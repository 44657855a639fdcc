//! Policy errors, each pinned to `file:line:col` so an operator can go straight to it.

use std::fmt;

/// A position in the policy text: 1-based line and column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub line: u64,
    pub column: u64,
}

impl Position {
    pub(crate) fn from_location(loc: serde_saphyr::Location) -> Option<Self> {
        // serde-saphyr reports line 0 for "unknown" (e.g. values buffered through flatten).
        (loc.line() > 0).then(|| Self {
            line: loc.line(),
            column: loc.column(),
        })
    }
}

/// One problem found in a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// Where it is, when known (a file that cannot be read has no position).
    pub position: Option<Position>,
    pub message: String,
}

impl PolicyError {
    pub(crate) fn at(position: Option<Position>, message: impl Into<String>) -> Self {
        Self {
            position,
            message: message.into(),
        }
    }
}

/// Everything wrong with one policy, in text order. Displays as one
/// `origin:line:col: message` line per error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors {
    /// The file name (or `<embedded>`) the text came from.
    pub origin: String,
    pub errors: Vec<PolicyError>,
}

impl PolicyErrors {
    pub(crate) fn new(origin: &str, mut errors: Vec<PolicyError>) -> Self {
        errors.sort_by_key(|e| e.position);
        Self {
            origin: origin.to_owned(),
            errors,
        }
    }
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            match e.position {
                Some(p) => write!(f, "{}:{}:{}: {}", self.origin, p.line, p.column, e.message)?,
                None => write!(f, "{}: {}", self.origin, e.message)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_one_line_per_error_in_text_order() {
        let errs = PolicyErrors::new(
            "p.yaml",
            vec![
                PolicyError::at(Some(Position { line: 9, column: 3 }), "b"),
                PolicyError::at(Some(Position { line: 2, column: 5 }), "a"),
            ],
        );
        assert_eq!(errs.to_string(), "p.yaml:2:5: a\np.yaml:9:3: b");
        let io = PolicyErrors::new("x.yaml", vec![PolicyError::at(None, "cannot read")]);
        assert_eq!(io.to_string(), "x.yaml: cannot read");
    }
}
