//! `${VAR}` and `${VAR:-default}` in destination settings, expanded once at
//! load, so that URLs and secrets can come from the environment and a missing
//! variable is a load error rather than a failed delivery.

/// Expands `${VAR}` and `${VAR:-default}`; an unset variable without a default
/// is an error naming it.
pub fn expand_env(input: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed ${{ in {input:?}"))?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("invalid variable name {name:?}"));
        }
        match (env(name).filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(format!("environment variable {name} is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_expansion() {
        let env = |k: &str| (k == "A").then(|| "x".to_owned());
        assert_eq!(expand_env("http://${A}/p", &env), Ok("http://x/p".into()));
        assert_eq!(expand_env("${B:-d}", &env), Ok("d".into()));
        assert!(
            expand_env("${B}", &env)
                .expect_err("unset")
                .contains("B is not set")
        );
        assert!(expand_env("${A", &env).is_err());
    }
}
