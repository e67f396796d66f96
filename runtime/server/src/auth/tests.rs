//! Auth files, tokens and grants.

use super::*;

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[test]
fn patterns_grants_and_tokens() {
    let (token, hash) = mint_token();
    let text = format!(
        r#"
        [[principal]]
        name = "loyalty"
        tokens = ["{hash}"]
        grants = [
          {{ allow = ["publish"], topics = ["points.*", "audit"] }},
          {{ allow = ["deploy", "read-state"], plugins = ["points"] }},
        ]
        "#
    );
    let auth = Authority::parse(&text).unwrap();
    let p = auth.authenticate(Some(&bearer(&token))).unwrap();
    // The scheme is case-insensitive (RFC 7235).
    let lower = auth
        .authenticate(Some(&format!("bearer  {token}")))
        .unwrap();
    assert_eq!(lower.name, "loyalty");
    assert!(auth.authenticate(Some(&format!("Basic {token}"))).is_err());
    assert!(auth.authenticate(Some(&token)).is_err());
    assert_eq!(p.name, "loyalty");
    assert!(p.allows(Operation::Publish, Resource::Topic("points.credited")));
    assert!(p.allows(Operation::Publish, Resource::Topic("audit")));
    assert!(!p.allows(Operation::Publish, Resource::Topic("audit2")));
    assert!(!p.allows(Operation::Subscribe, Resource::Topic("audit")));
    assert!(p.allows(Operation::Deploy, Resource::Plugin("points")));
    assert!(!p.allows(Operation::Deploy, Resource::Plugin("points2")));
    assert!(!p.allows(Operation::Publish, Resource::Plugin("points")));
    let e = auth.authenticate(Some(&bearer("weir_nope"))).unwrap_err();
    assert!(matches!(e, AuthError::Unauthenticated(_)));
    assert!(auth.authenticate(None).is_err());
    let denied = auth
        .require(
            Some(&bearer(&token)),
            Operation::Delete,
            Resource::Topic("orders"),
        )
        .unwrap_err()
        .to_string();
    assert!(
        denied.contains("may not delete topic \"orders\""),
        "{denied}"
    );
}

#[test]
fn bad_files_say_what_is_wrong() {
    let h = "ab".repeat(32);
    for (text, needle) in [
        (
            format!("[[principal]]\nname = \"a\"\ntokens = [\"{h}\"]\ngrants = [{{ allow = [\"publish\"], plugins = [\"x\"] }}]"),
            "needs `topics",
        ),
        (
            format!("[[principal]]\nname = \"a\"\ntokens = [\"{h}\"]\ngrants = [{{ allow = [\"fly\"], topics = [\"x\"] }}]"),
            "unknown variant",
        ),
        ("[[principal]]\nname = \"a\"\ntokens = [\"xyz\"]".to_string(), "sha256 hex"),
        ("[[principal]]\nname = \"a\"".to_string(), "weir auth token"),
        (
            format!("[[principal]]\nname = \"anonymous\"\ntokens = [\"{h}\"]"),
            "reserved",
        ),
        (
            format!("[[principal]]\nname = \"a\"\ntokens = [\"{h}\"]\ngrants = [{{ allow = [\"publish\"], topics = [\"a*b\"] }}]"),
            "may only end",
        ),
    ] {
        let e = Authority::parse(&text).unwrap_err();
        assert!(e.contains(needle), "{e} (wanted {needle})");
    }
}
