use super::*;

fn principal(id: &str) -> Principal {
    Principal {
        object_id: id.into(),
        client_id: format!("client-{id}"),
        display_name: id.into(),
        kind: PrincipalKind::ManagedIdentity,
        enabled: true,
    }
}

fn rbac(assignments: &[(&str, &str, &str)], groups: &[(&str, &str)]) -> Rbac {
    Rbac::new(
        builtin_roles(),
        assignments
            .iter()
            .enumerate()
            .map(|(i, (p, r, s))| RoleAssignment {
                id: format!("a{i}"),
                principal_id: p.to_string(),
                role_id: r.to_string(),
                scope: Scope::parse(s).unwrap(),
            })
            .collect(),
        groups.iter().map(|(g, m)| (g.to_string(), m.to_string())).collect(),
    )
}

const SECRET_ACTIONS: [Action; 9] = [
    Action::SecretGet,
    Action::SecretSet,
    Action::SecretReadMetadata,
    Action::SecretUpdate,
    Action::SecretDelete,
    Action::SecretRecover,
    Action::SecretPurge,
    Action::SecretBackup,
    Action::SecretRestore,
];

/// Every built-in role × every secret action, as Key Vault defines the roles.
#[test]
fn role_by_operation_matrix() {
    use Action::*;
    let expected: [(&str, &[Action]); 6] = [
        (KEY_VAULT_ADMINISTRATOR, &SECRET_ACTIONS),
        (KEY_VAULT_SECRETS_OFFICER, &SECRET_ACTIONS),
        (KEY_VAULT_SECRETS_USER, &[SecretGet, SecretReadMetadata]),
        (KEY_VAULT_READER, &[SecretReadMetadata]),
        (KEY_VAULT_PURGE_OPERATOR, &[]),
        (KEY_VAULT_DATA_ACCESS_ADMINISTRATOR, &[]),
    ];
    for (role_id, allowed) in expected {
        for scope in ["/", "/vaults/kv1", "/vaults/kv1/secrets/db"] {
            let r = rbac(&[("p", role_id, scope)], &[]);
            for action in SECRET_ACTIONS {
                let got = r.authorize(&principal("p"), action, Resource::Secret("kv1", "db")).is_ok();
                assert_eq!(got, allowed.contains(&action), "{role_id} at {scope}: {action:?}");
                // Nothing leaks to another vault, nor (for secret scope) to another secret.
                assert!(
                    r.authorize(&principal("p"), action, Resource::Secret("kv2", "db")).is_err()
                        || scope == "/"
                );
                if scope.contains("/secrets/") {
                    assert!(r.authorize(&principal("p"), action, Resource::Secret("kv1", "other")).is_err());
                    assert!(r.authorize(&principal("p"), action, Resource::Vault("kv1")).is_err());
                }
            }
        }
    }
}

#[test]
fn deny_by_default_and_disabled_principals() {
    let r = rbac(&[("p", KEY_VAULT_ADMINISTRATOR, "/")], &[]);
    assert!(r.authorize(&principal("q"), Action::SecretGet, Resource::Secret("v", "s")).is_err());
    let mut disabled = principal("p");
    disabled.enabled = false;
    assert!(r.authorize(&disabled, Action::SecretGet, Resource::Secret("v", "s")).is_err());
    let denial = r.authorize(&principal("q"), Action::SecretGet, Resource::Secret("v", "s")).unwrap_err();
    assert!(denial.to_string().contains("Microsoft.KeyVault/vaults/secrets/getSecret/action"));
}

#[test]
fn groups_pass_their_roles_to_members() {
    let r = rbac(&[("g", KEY_VAULT_SECRETS_USER, "/vaults/kv1")], &[("g", "p")]);
    let grant = r.authorize(&principal("p"), Action::SecretGet, Resource::Secret("kv1", "s")).unwrap();
    assert_eq!(grant.role, "Key Vault Secrets User");
    assert!(r.authorize(&principal("p"), Action::SecretSet, Resource::Secret("kv1", "s")).is_err());
}

#[test]
fn data_access_administrator_may_assign_only_key_vault_roles() {
    let r = rbac(&[("p", KEY_VAULT_DATA_ACCESS_ADMINISTRATOR, "/vaults/kv1")], &[]);
    let res = Resource::Vault("kv1");
    assert!(r
        .authorize_assignment(&principal("p"), Action::RoleAssignmentWrite, res, KEY_VAULT_SECRETS_USER)
        .is_ok());
    assert!(r
        .authorize_assignment(&principal("p"), Action::RoleAssignmentWrite, res, COFFER_ADMINISTRATOR)
        .is_err());
    assert!(r.authorize(&principal("p"), Action::SecretGet, Resource::Secret("kv1", "s")).is_err());
    let admin = rbac(&[("p", COFFER_ADMINISTRATOR, "/")], &[]);
    assert!(admin
        .authorize_assignment(&principal("p"), Action::RoleAssignmentWrite, res, COFFER_ADMINISTRATOR)
        .is_ok());
}

#[test]
fn scopes_parse_and_compare_case_insensitively() {
    assert_eq!(Scope::parse("/"), Some(Scope::Server));
    assert_eq!(Scope::parse("/vaults/KV1"), Some(Scope::Vault("kv1".into())));
    assert_eq!(Scope::parse("/vaults/kv1/secrets/Db"), Some(Scope::Secret("kv1".into(), "db".into())));
    assert_eq!(Scope::parse("/vaults"), None);
    assert_eq!(Scope::parse("vaults/x"), None);
    assert!(Scope::parse("/vaults/kv1/secrets/db").unwrap().covers(Resource::Secret("kv1", "DB")));
    assert_eq!(Scope::parse("/vaults/kv1/secrets/db").unwrap().to_string(), "/vaults/kv1/secrets/db");
}

#[test]
fn globs() {
    assert!(glob_match("*", "anything"));
    assert!(glob_match("Microsoft.KeyVault/vaults/*/read", "microsoft.keyvault/vaults/secrets/read"));
    assert!(!glob_match(
        "Microsoft.KeyVault/vaults/*/read",
        "Microsoft.KeyVault/vaults/secrets/readMetadata/action"
    ));
    assert!(glob_match(
        "Microsoft.KeyVault/vaults/secrets/*",
        "Microsoft.KeyVault/vaults/secrets/purge/action"
    ));
    assert!(!glob_match("Coffer/principals/*", "Coffer/audit/read"));
}

#[test]
fn custom_roles_by_actions() {
    let custom = RoleDefinition {
        id: "custom".into(),
        name: "Secret Rotator".into(),
        description: String::new(),
        actions: vec![],
        data_actions: vec!["Microsoft.KeyVault/vaults/secrets/setSecret/action".into()],
        assignable_roles: None,
        builtin: false,
    };
    let mut roles = builtin_roles();
    roles.push(custom);
    let r = Rbac::new(
        roles,
        vec![RoleAssignment {
            id: "a".into(),
            principal_id: "p".into(),
            role_id: "custom".into(),
            scope: Scope::Server,
        }],
        vec![],
    );
    assert!(r.authorize(&principal("p"), Action::SecretSet, Resource::Secret("v", "s")).is_ok());
    assert!(r.authorize(&principal("p"), Action::SecretGet, Resource::Secret("v", "s")).is_err());
}
