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
    assert_eq!(Scope::parse("/"), Ok(Scope::Server));
    assert_eq!(Scope::parse("/vaults/KV1"), Ok(Scope::Vault("kv1".into())));
    assert_eq!(Scope::parse("/vaults/kv1/secrets/Db"), Ok(Scope::Secret("kv1".into(), "db".into())));
    assert!(Scope::parse("/vaults").is_err());
    assert!(Scope::parse("vaults/x").is_err());
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

/// Issue 15: scopes are parsed strictly; anything but the three canonical shapes with valid
/// names is refused, so nothing meaningless is stored or shown.
#[test]
fn scopes_are_parsed_strictly() {
    for bad in [
        "",
        "//",
        "///",
        "/vaults/",
        "/vaults//",
        "/vaults/*",
        "/vaults/dev%2f..%2fprod",
        "/vaults/dev/",
        "/vaults/dev//secrets/x",
        "/vaults/dev/secrets",
        "/vaults/dev/secrets/",
        "/vaults/dev/secrets/a/b",
        "/vaults/dev/secrets/a.b",
        "/vaults/dev/secrets/*",
        "/vaults/dev/keys/x",
        "/vaults/ab",
        "/vaults/dev--x",
        "/Vaults/dev",
        " /",
        "/ ",
        "/vaults/dev?x",
        "\\vaults\\dev",
        "/vaults/dev/secrets/db/",
    ] {
        assert!(Scope::parse(bad).is_err(), "{bad:?} should be refused");
    }
    let err = Scope::parse("/vaults/x\n").unwrap_err().to_string();
    assert!(!err.contains('\n'), "{err}");
    assert!(Scope::parse("/vaults/a_b").unwrap_err().to_string().contains("vault name"));
    assert!(Scope::parse("/x").unwrap_err().to_string().contains("'/vaults/VAULT'"));
    // The canonical form round-trips: what is stored parses to the same scope.
    for good in ["/", "/vaults/Dev-1", "/vaults/dev/secrets/DB-Password"] {
        let scope = Scope::parse(good).unwrap();
        assert_eq!(Scope::parse(&scope.to_string()), Ok(scope.clone()));
        assert_eq!(scope.to_string(), good.to_ascii_lowercase());
    }
}

fn enabled(id: &str) -> Principal {
    Principal { kind: PrincipalKind::ServicePrincipal, ..principal(id) }
}

/// The dev administrator pattern: `admin` holds Coffer Administrator on `/`; `op` holds Coffer
/// Identity Operator on `/`.
const ADMIN_AND_OPERATOR: [(&str, &str, &str); 2] =
    [("admin", COFFER_ADMINISTRATOR, "/"), ("op", COFFER_IDENTITY_OPERATOR, "/")];

#[test]
fn principal_changes_need_every_permission_of_the_target() {
    let r = rbac(
        &[&ADMIN_AND_OPERATOR[..], &[("plain-user", KEY_VAULT_SECRETS_USER, "/vaults/kv1")]].concat(),
        &[],
    );
    // The administrator manages everyone, the operator included.
    for target in ["op", "plain-user", "nobody", "admin"] {
        assert!(r.authorize_principal_change(&enabled("admin"), &[target]).is_ok(), "{target}");
    }
    // The operator manages principals with no more than it has: none, or itself.
    assert!(r.authorize_principal_change(&enabled("op"), &["nobody"]).is_ok());
    assert!(r.authorize_principal_change(&enabled("op"), &["op"]).is_ok());
    let denial = r.authorize_principal_change(&enabled("op"), &["admin"]).unwrap_err();
    assert!(!matches!(denial.action, Action::PrincipalRead | Action::PrincipalWrite), "{denial:?}");
    let message = denial.to_string();
    assert!(message.contains("Action: '") && message.contains("scope '/'"), "{message}");
    // A data role the operator lacks is enough to refuse.
    let denial = r.authorize_principal_change(&enabled("op"), &["plain-user"]).unwrap_err();
    assert!(denial.action.is_data_action(), "{denial:?}");
    assert!(denial.to_string().contains("scope '/vaults/kv1'"), "{denial}");
    // Every conferring principal counts (an agent and the identities bound to it).
    assert!(r.authorize_principal_change(&enabled("op"), &["nobody", "admin"]).is_err());
    // Without Coffer/principals/write nothing, even over a principal with no role.
    assert_eq!(
        r.authorize_principal_change(&enabled("plain-user"), &["nobody"]).unwrap_err().action,
        Action::PrincipalWrite
    );
    assert!(r.authorize_principal_change(&enabled("stranger"), &["nobody"]).is_err());
}

#[test]
fn principal_changes_respect_scope_containment() {
    let r = rbac(
        &[
            ("op", COFFER_IDENTITY_OPERATOR, "/"),
            ("op", KEY_VAULT_SECRETS_USER, "/vaults/kv1"),
            ("on-secret", KEY_VAULT_SECRETS_USER, "/vaults/kv1/secrets/db"),
            ("on-vault", KEY_VAULT_SECRETS_USER, "/vaults/kv1"),
            ("other-vault", KEY_VAULT_SECRETS_USER, "/vaults/kv2"),
            ("everywhere", KEY_VAULT_SECRETS_USER, "/"),
            ("officer", KEY_VAULT_SECRETS_OFFICER, "/vaults/kv1/secrets/db"),
        ],
        &[],
    );
    let op = enabled("op");
    assert!(r.authorize_principal_change(&op, &["on-secret"]).is_ok(), "narrower scope");
    assert!(r.authorize_principal_change(&op, &["on-vault"]).is_ok(), "same scope");
    assert!(r.authorize_principal_change(&op, &["other-vault"]).is_err(), "another vault");
    assert!(r.authorize_principal_change(&op, &["everywhere"]).is_err(), "wider scope");
    assert!(r.authorize_principal_change(&op, &["officer"]).is_err(), "more actions");
    // A caller holding a role on one secret does not cover the same role on the vault.
    let narrow = rbac(
        &[
            ("op", COFFER_IDENTITY_OPERATOR, "/"),
            ("op", KEY_VAULT_SECRETS_USER, "/vaults/kv1/secrets/db"),
            ("on-vault", KEY_VAULT_SECRETS_USER, "/vaults/kv1"),
        ],
        &[],
    );
    assert!(narrow.authorize_principal_change(&op, &["on-vault"]).is_err());
}

#[test]
fn principal_changes_count_groups_both_ways() {
    let r = rbac(
        &[
            ("op", COFFER_IDENTITY_OPERATOR, "/"),
            ("admins", COFFER_ADMINISTRATOR, "/"),
            ("readers", KEY_VAULT_SECRETS_USER, "/vaults/kv1"),
            ("operators", COFFER_IDENTITY_OPERATOR, "/"),
            ("op2-group", KEY_VAULT_SECRETS_USER, "/vaults/kv1"),
        ],
        &[("admins", "alice"), ("readers", "bob"), ("operators", "op2"), ("op2-group", "op2")],
    );
    let op = enabled("op");
    // A group is judged by what it confers; a member by what it holds through its groups.
    assert!(r.authorize_principal_change(&op, &["admins"]).is_err());
    assert!(r.authorize_principal_change(&op, &["alice"]).is_err());
    assert!(r.authorize_principal_change(&op, &["readers"]).is_err());
    assert!(r.authorize_principal_change(&op, &["bob"]).is_err());
    // The caller's own groups count for it.
    let op2 = enabled("op2");
    assert!(r.authorize_principal_change(&op2, &["readers"]).is_ok());
    assert!(r.authorize_principal_change(&op2, &["bob"]).is_ok());
    assert!(r.authorize_principal_change(&op2, &["admins"]).is_err());
    // Through the administrators' group, alice manages everyone.
    assert!(r.authorize_principal_change(&enabled("alice"), &["admins", "op", "bob"]).is_ok());
}

#[test]
fn principal_changes_compare_assignable_roles_conditions() {
    let custom = RoleDefinition {
        id: "assigner".into(),
        name: "Unconditional assigner".into(),
        description: String::new(),
        actions: vec![
            "Microsoft.Authorization/*".into(),
            "Microsoft.KeyVault/vaults/read".into(),
            "Coffer/principals/*".into(),
        ],
        data_actions: vec![],
        assignable_roles: None,
        builtin: false,
    };
    let mut roles = builtin_roles();
    roles.push(custom);
    let assignment = |id: &str, p: &str, role: &str| RoleAssignment {
        id: id.into(),
        principal_id: p.into(),
        role_id: role.into(),
        scope: Scope::Server,
    };
    let r = Rbac::new(
        roles,
        vec![
            assignment("1", "daa-op", KEY_VAULT_DATA_ACCESS_ADMINISTRATOR),
            assignment("2", "daa-op", COFFER_IDENTITY_OPERATOR),
            assignment("3", "daa", KEY_VAULT_DATA_ACCESS_ADMINISTRATOR),
            assignment("4", "unlimited", "assigner"),
        ],
        vec![],
    );
    // Same condition: a Data Access Administrator (and operator) manages another one.
    assert!(r.authorize_principal_change(&enabled("daa-op"), &["daa"]).is_ok());
    // A wider one (no condition) is not covered by a conditional grant of the same actions.
    let denial = r.authorize_principal_change(&enabled("daa-op"), &["unlimited"]).unwrap_err();
    assert!(
        matches!(denial.action, Action::RoleAssignmentWrite | Action::RoleAssignmentDelete),
        "{denial:?}"
    );
    // The unconditional assigner covers the conditional one.
    assert!(r.authorize_principal_change(&enabled("unlimited"), &["daa"]).is_ok());
}

#[test]
fn disabled_callers_change_nothing() {
    let r = rbac(&ADMIN_AND_OPERATOR, &[]);
    let mut admin = enabled("admin");
    admin.enabled = false;
    assert!(r.authorize_principal_change(&admin, &["nobody"]).is_err());
    assert!(r
        .authorize_role_assignment(&admin, Action::RoleAssignmentWrite, &Scope::Server, KEY_VAULT_READER, "x")
        .is_err());
}

#[test]
fn signing_key_rotation_is_the_administrators_alone() {
    let r = rbac(&ADMIN_AND_OPERATOR, &[]);
    assert!(r.authorize(&enabled("admin"), Action::SigningKeyRotate, Resource::Server).is_ok());
    assert!(r.authorize(&enabled("op"), Action::SigningKeyRotate, Resource::Server).is_err());
    // Every action has its own bit and name.
    let names: std::collections::HashSet<&str> = Action::ALL.iter().map(Action::name).collect();
    assert_eq!(names.len(), Action::ALL.len());
    assert!(Action::ALL.iter().enumerate().all(|(i, a)| *a as usize == i));
}

#[test]
fn role_assignments_do_not_raise_their_maker() {
    let r = rbac(
        &[
            ("daa", KEY_VAULT_DATA_ACCESS_ADMINISTRATOR, "/vaults/kv1"),
            ("op", COFFER_IDENTITY_OPERATOR, "/"),
            ("admin", COFFER_ADMINISTRATOR, "/"),
            ("team", KEY_VAULT_DATA_ACCESS_ADMINISTRATOR, "/vaults/kv2"),
        ],
        &[("team", "member")],
    );
    let kv1 = Scope::Vault("kv1".into());
    let write = Action::RoleAssignmentWrite;
    // Granting access to others is what the Data Access Administrator is for…
    assert!(r.authorize_role_assignment(&enabled("daa"), write, &kv1, KEY_VAULT_SECRETS_USER, "app").is_ok());
    // …not to itself, nor to a group it is in.
    let denial = r
        .authorize_role_assignment(&enabled("daa"), write, &kv1, KEY_VAULT_ADMINISTRATOR, "daa")
        .unwrap_err();
    assert!(denial.action.is_data_action() || denial.action == Action::VaultRead, "{denial:?}");
    let kv2 = Scope::Vault("kv2".into());
    assert!(r
        .authorize_role_assignment(&enabled("member"), write, &kv2, KEY_VAULT_SECRETS_USER, "team")
        .is_err());
    // What it already holds it may assign to itself (a no-op for its permissions).
    assert!(r
        .authorize_role_assignment(&enabled("daa"), write, &kv1, KEY_VAULT_DATA_ACCESS_ADMINISTRATOR, "daa")
        .is_ok());
    // Outside its scope, or a role outside its condition: refused as before.
    assert!(r
        .authorize_role_assignment(&enabled("daa"), write, &Scope::Server, KEY_VAULT_SECRETS_USER, "app")
        .is_err());
    assert!(r.authorize_role_assignment(&enabled("daa"), write, &kv1, COFFER_ADMINISTRATOR, "app").is_err());
    // Removing the administrator's assignment is not the Data Access Administrator's.
    assert!(r
        .authorize_role_assignment(
            &enabled("daa"),
            Action::RoleAssignmentDelete,
            &Scope::Server,
            COFFER_ADMINISTRATOR,
            "admin"
        )
        .is_err());
    // The operator assigns nothing, to itself or anyone.
    for assignee in ["op", "app"] {
        assert!(r
            .authorize_role_assignment(&enabled("op"), write, &Scope::Server, COFFER_ADMINISTRATOR, assignee)
            .is_err());
    }
    // The administrator assigns anything, to itself too.
    assert!(r
        .authorize_role_assignment(&enabled("admin"), write, &Scope::Server, COFFER_ADMINISTRATOR, "admin")
        .is_ok());
}
