//! What the loader reports: one [`LoadError`] per problem, naming its file
//! and, where it has them, its line and stage; [`LoadErrors`] for a whole set,
//! since the loader reports every problem it finds, not just the first.

use std::fmt;
use std::path::PathBuf;

/// One problem found while loading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub stage: Option<String>,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(stage) = &self.stage {
            write!(f, ": stage {stage:?}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a pipeline set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LoadErrors(pub Vec<LoadError>);

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}
