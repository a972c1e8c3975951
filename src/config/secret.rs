//! Keeping passwords out of logs and `check` output.
//!
//! Invariant: anything this crate prints about a connection goes through
//! these functions first, so a password written in the config never leaves
//! the process except towards the server it is meant for.

/// The Postgres URL with its password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let authority_start = scheme_end + 3;
    let rest = &url[authority_start..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return redact_query_password(url);
    };
    let userinfo = &authority[..at];
    let redacted_userinfo = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None => userinfo.to_string(),
    };
    let mut redacted = String::with_capacity(url.len());
    redacted.push_str(&url[..authority_start]);
    redacted.push_str(&redacted_userinfo);
    redacted.push_str(&rest[at..]);
    // `password=` may also sit in the query string.
    redact_query_password(&redacted)
}

fn redact_query_password(url: &str) -> String {
    let Some(query_start) = url.find('?') else {
        return url.to_string();
    };
    let (head, query) = url.split_at(query_start + 1);
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{head}{}", pairs.join("&"))
}

/// Whether a librdkafka property holds a credential (`sasl.password`,
/// `ssl.key.password`, `sasl.oauthbearer.client.secret`, PEM keys, …).
pub fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.contains("password")
        || key.contains("secret")
        || key.ends_with(".key.pem")
        || key.contains("jaas")
}

/// A property value fit to print.
pub fn redact_property(key: &str, value: &str) -> String {
    if is_secret_property(key) {
        "***".to_string()
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_password_is_hidden_and_the_rest_kept() {
        assert_eq!(
            redact_url("postgres://relay:s3cr3t@db.example:5432/orders?sslmode=verify-full"),
            "postgres://relay:***@db.example:5432/orders?sslmode=verify-full"
        );
        assert_eq!(
            redact_url("postgres://relay@db/orders"),
            "postgres://relay@db/orders"
        );
        assert_eq!(
            redact_url("postgres://db/orders?user=a&password=x"),
            "postgres://db/orders?user=a&password=***"
        );
        assert_eq!(
            redact_url("postgres://u:p%40ss@h/d"),
            "postgres://u:***@h/d"
        );
    }

    #[test]
    fn credential_properties_are_recognised() {
        assert!(is_secret_property("sasl.password"));
        assert!(is_secret_property("ssl.key.password"));
        assert!(is_secret_property("sasl.oauthbearer.client.secret"));
        assert!(is_secret_property("ssl.key.pem"));
        assert!(!is_secret_property("sasl.username"));
        assert_eq!(redact_property("sasl.password", "hunter2"), "***");
        assert_eq!(redact_property("security.protocol", "SASL_SSL"), "SASL_SSL");
    }
}
