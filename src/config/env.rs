//! `${ENV_VAR}` expansion in every string value of the config.

use super::Problem;

/// Replaces each `${NAME}` in every string of `table`; a variable that is not
/// set is a problem at the key that names it. `$${` writes a literal `${`.
pub fn expand(table: &mut toml::Table, lookup: &dyn Fn(&str) -> Option<String>) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (key, value) in table.iter_mut() {
        expand_value(value, key.clone(), lookup, &mut problems);
    }
    problems
}

fn expand_value(
    value: &mut toml::Value,
    path: String,
    lookup: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<Problem>,
) {
    match value {
        toml::Value::String(s) => match expand_str(s, lookup) {
            Ok(expanded) => *s = expanded,
            Err(message) => problems.push(Problem::new(path, message)),
        },
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_value(item, format!("{path}[{i}]"), lookup, problems);
            }
        }
        toml::Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                expand_value(item, format!("{path}.{key}"), lookup, problems);
            }
        }
        _ => {}
    }
}

fn expand_str(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    if !s.contains("${") {
        return Ok(s.to_owned());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        if let Some(escaped) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = escaped;
        } else if let Some(body) = after.strip_prefix("${") {
            let end = body
                .find('}')
                .ok_or_else(|| "unterminated ${ in value".to_string())?;
            let name = &body[..end];
            if name.is_empty() {
                return Err("empty ${} in value".into());
            }
            let value =
                lookup(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
            out.push_str(&value);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<String> {
        (name == "KEY").then(|| "secret".to_string())
    }

    #[test]
    fn expands_whole_and_embedded_references() {
        assert_eq!(expand_str("${KEY}", &lookup).as_deref(), Ok("secret"));
        assert_eq!(
            expand_str("a-${KEY}-b", &lookup).as_deref(),
            Ok("a-secret-b")
        );
        assert_eq!(expand_str("cost $5", &lookup).as_deref(), Ok("cost $5"));
        assert_eq!(expand_str("$${KEY}", &lookup).as_deref(), Ok("${KEY}"));
    }

    #[test]
    fn missing_variable_is_named_at_its_key() {
        let mut table: toml::Table = "[[upstreams]]\napi_key = \"${NOPE}\""
            .parse()
            .expect("toml");
        let problems = expand(&mut table, &lookup);
        assert_eq!(problems.len(), 1);
        assert_eq!(
            problems[0].to_string(),
            "upstreams[0].api_key: environment variable NOPE is not set"
        );
    }
}
