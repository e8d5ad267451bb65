//! Authorization: Key Vault's built-in roles (and Coffer's own and custom ones) assigned to
//! principals or groups at a scope, evaluated by one pure function, [`Rbac::authorize`]. Deny
//! by default.
//!
//! Evaluation is on the hot path of every request, so a role's permissions are compiled into a
//! bit set of [`Action`]s once, when the snapshot is built, and `authorize` only walks the
//! caller's assignments (and those of its groups) without allocating.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use crate::names::{truncate_for_message, NameError, SecretName, VaultName};

/// Who is calling, as established by authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub object_id: String,
    pub client_id: String,
    pub display_name: String,
    pub kind: PrincipalKind,
    pub enabled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PrincipalKind {
    User,
    ServicePrincipal,
    ManagedIdentity,
    Group,
    /// A host's identity agent (`coffer agent`); it can only broker tokens for identities bound
    /// to it.
    Agent,
}

impl PrincipalKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::User => "user",
            Self::ServicePrincipal => "service-principal",
            Self::ManagedIdentity => "managed-identity",
            Self::Group => "group",
            Self::Agent => "agent",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "user" => Self::User,
            "service-principal" => Self::ServicePrincipal,
            "managed-identity" => Self::ManagedIdentity,
            "group" => Self::Group,
            "agent" => Self::Agent,
            _ => return None,
        })
    }
}

/// Everything a request can ask to do. Data actions use Key Vault's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Action {
    SecretGet,
    SecretSet,
    SecretReadMetadata,
    SecretUpdate,
    SecretDelete,
    SecretRecover,
    SecretPurge,
    SecretBackup,
    SecretRestore,
    VaultRead,
    VaultWrite,
    VaultDelete,
    PrincipalRead,
    PrincipalWrite,
    RoleAssignmentRead,
    RoleAssignmentWrite,
    RoleAssignmentDelete,
    RoleDefinitionRead,
    RoleDefinitionWrite,
    AuditRead,
    /// Rotating the token-signing key: whoever may do it can invalidate every token at will,
    /// so it is not part of managing principals.
    SigningKeyRotate,
}

impl Action {
    pub const ALL: [Action; 21] = [
        Action::SecretGet,
        Action::SecretSet,
        Action::SecretReadMetadata,
        Action::SecretUpdate,
        Action::SecretDelete,
        Action::SecretRecover,
        Action::SecretPurge,
        Action::SecretBackup,
        Action::SecretRestore,
        Action::VaultRead,
        Action::VaultWrite,
        Action::VaultDelete,
        Action::PrincipalRead,
        Action::PrincipalWrite,
        Action::RoleAssignmentRead,
        Action::RoleAssignmentWrite,
        Action::RoleAssignmentDelete,
        Action::RoleDefinitionRead,
        Action::RoleDefinitionWrite,
        Action::AuditRead,
        Action::SigningKeyRotate,
    ];

    /// The operation name, as Key Vault / Azure RBAC spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::SecretGet => "Microsoft.KeyVault/vaults/secrets/getSecret/action",
            Self::SecretSet => "Microsoft.KeyVault/vaults/secrets/setSecret/action",
            Self::SecretReadMetadata => "Microsoft.KeyVault/vaults/secrets/readMetadata/action",
            Self::SecretUpdate => "Microsoft.KeyVault/vaults/secrets/update/action",
            Self::SecretDelete => "Microsoft.KeyVault/vaults/secrets/delete",
            Self::SecretRecover => "Microsoft.KeyVault/vaults/secrets/recover/action",
            Self::SecretPurge => "Microsoft.KeyVault/vaults/secrets/purge/action",
            Self::SecretBackup => "Microsoft.KeyVault/vaults/secrets/backup/action",
            Self::SecretRestore => "Microsoft.KeyVault/vaults/secrets/restore/action",
            Self::VaultRead => "Microsoft.KeyVault/vaults/read",
            Self::VaultWrite => "Microsoft.KeyVault/vaults/write",
            Self::VaultDelete => "Microsoft.KeyVault/vaults/delete",
            Self::PrincipalRead => "Coffer/principals/read",
            Self::PrincipalWrite => "Coffer/principals/write",
            Self::RoleAssignmentRead => "Microsoft.Authorization/roleAssignments/read",
            Self::RoleAssignmentWrite => "Microsoft.Authorization/roleAssignments/write",
            Self::RoleAssignmentDelete => "Microsoft.Authorization/roleAssignments/delete",
            Self::RoleDefinitionRead => "Microsoft.Authorization/roleDefinitions/read",
            Self::RoleDefinitionWrite => "Microsoft.Authorization/roleDefinitions/write",
            Self::AuditRead => "Coffer/audit/read",
            Self::SigningKeyRotate => "Coffer/signingKeys/rotate/action",
        }
    }

    /// Data actions (the secrets themselves) versus management actions.
    pub fn is_data_action(&self) -> bool {
        matches!(
            self,
            Self::SecretGet
                | Self::SecretSet
                | Self::SecretReadMetadata
                | Self::SecretUpdate
                | Self::SecretDelete
                | Self::SecretRecover
                | Self::SecretPurge
                | Self::SecretBackup
                | Self::SecretRestore
        )
    }

    /// Changes of role assignments: the actions a role's `assignable_roles` condition limits.
    fn is_assignment_change(&self) -> bool {
        matches!(self, Self::RoleAssignmentWrite | Self::RoleAssignmentDelete)
    }

    fn bit(&self) -> u32 {
        1 << (*self as u32)
    }
}

/// Where an assignment applies: the server, a vault, or one secret. Written like Key Vault
/// scopes: `/`, `/vaults/NAME`, `/vaults/NAME/secrets/SECRET`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    Server,
    Vault(String),
    Secret(String, String),
}

impl Scope {
    /// Parses exactly `/`, `/vaults/{vault}` or `/vaults/{vault}/secrets/{secret}`, the names
    /// valid as [`VaultName`] and [`SecretName`] (so no `*`, `%`, `.`, empty segment or trailing
    /// slash), into the canonical form: names lowercased, as lookups compare them. A scope
    /// naming nothing that can exist would be stored and shown as if it meant something.
    pub fn parse(raw: &str) -> Result<Self, NameError> {
        let invalid = || NameError::Scope(truncate_for_message(raw));
        let bad_name = |e| NameError::ScopeName(truncate_for_message(raw), Box::new(e));
        if raw == "/" {
            return Ok(Self::Server);
        }
        let rest = raw.strip_prefix("/vaults/").ok_or_else(invalid)?;
        let mut parts = rest.split('/');
        let vault = VaultName::parse(parts.next().ok_or_else(invalid)?).map_err(bad_name)?;
        match (parts.next(), parts.next(), parts.next()) {
            (None, _, _) => Ok(Self::Vault(vault.as_str().to_owned())),
            (Some("secrets"), Some(secret), None) => {
                let secret = SecretName::parse(secret).map_err(bad_name)?;
                Ok(Self::Secret(vault.as_str().to_owned(), secret.key()))
            }
            _ => Err(invalid()),
        }
    }

    /// The resource this scope is: an assignment at `self` covers `other` when
    /// `self.covers(other.as_resource())`.
    pub fn as_resource(&self) -> Resource<'_> {
        match self {
            Self::Server => Resource::Server,
            Self::Vault(v) => Resource::Vault(v),
            Self::Secret(v, s) => Resource::Secret(v, s),
        }
    }

    /// Does an assignment at this scope apply to `resource`? Names compare case-insensitively.
    pub fn covers(&self, resource: Resource<'_>) -> bool {
        match (self, resource) {
            (Self::Server, _) => true,
            (Self::Vault(v), Resource::Vault(rv) | Resource::Secret(rv, _)) => v.eq_ignore_ascii_case(rv),
            (Self::Secret(v, s), Resource::Secret(rv, rs)) => {
                v.eq_ignore_ascii_case(rv) && s.eq_ignore_ascii_case(rs)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Server => f.write_str("/"),
            Self::Vault(v) => write!(f, "/vaults/{v}"),
            Self::Secret(v, s) => write!(f, "/vaults/{v}/secrets/{s}"),
        }
    }
}

/// What a request acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    Server,
    Vault(&'a str),
    Secret(&'a str, &'a str),
}

/// A role: management `actions` and `data_actions`, as patterns with `*` wildcards
/// (case-insensitive), like Azure role definitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleDefinition {
    pub id: String,
    pub name: String,
    pub description: String,
    pub actions: Vec<String>,
    pub data_actions: Vec<String>,
    /// When set, role-assignment actions granted by this role may only assign these role ids
    /// (Key Vault Data Access Administrator's condition).
    pub assignable_roles: Option<Vec<String>>,
    pub builtin: bool,
}

impl RoleDefinition {
    fn compile(&self) -> u32 {
        Action::ALL
            .iter()
            .filter(|a| {
                let patterns = if a.is_data_action() { &self.data_actions } else { &self.actions };
                patterns.iter().any(|p| glob_match(p, a.name()))
            })
            .fold(0, |mask, a| mask | a.bit())
    }

    pub fn permits(&self, action: Action) -> bool {
        self.compile() & action.bit() != 0
    }
}

/// `*` matches any run of characters; comparison ignores ASCII case.
fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.to_ascii_lowercase(), text.to_ascii_lowercase());
    let parts: Vec<&str> = p.split('*').collect();
    if parts.len() == 1 {
        return p == t;
    }
    let mut rest = t.as_str();
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    true
}

pub const KEY_VAULT_ADMINISTRATOR: &str = "00482a5a-887f-4fb3-b363-3b7fe8e74483";
pub const KEY_VAULT_SECRETS_OFFICER: &str = "b86a8fe4-44ce-4948-aee5-eccb2c155cd7";
pub const KEY_VAULT_SECRETS_USER: &str = "4633458b-17de-408a-b874-0445c86b69e6";
pub const KEY_VAULT_READER: &str = "21090545-7ca7-4776-b22c-e363652d74d2";
pub const KEY_VAULT_PURGE_OPERATOR: &str = "a68e7c17-0ab2-4c09-9a58-125dae29748c";
pub const KEY_VAULT_DATA_ACCESS_ADMINISTRATOR: &str = "8b54135c-b56d-4d72-a534-26097cfdc8d8";
pub const COFFER_ADMINISTRATOR: &str = "c0ffee00-0000-4000-8000-000000000001";
pub const COFFER_IDENTITY_OPERATOR: &str = "c0ffee00-0000-4000-8000-000000000002";

/// The Key Vault roles a Data Access Administrator may assign.
const KEY_VAULT_ROLES: [&str; 6] = [
    KEY_VAULT_ADMINISTRATOR,
    KEY_VAULT_SECRETS_OFFICER,
    KEY_VAULT_SECRETS_USER,
    KEY_VAULT_READER,
    KEY_VAULT_PURGE_OPERATOR,
    KEY_VAULT_DATA_ACCESS_ADMINISTRATOR,
];

fn role(id: &str, name: &str, description: &str, actions: &[&str], data_actions: &[&str]) -> RoleDefinition {
    RoleDefinition {
        id: id.into(),
        name: name.into(),
        description: description.into(),
        actions: actions.iter().map(|s| s.to_string()).collect(),
        data_actions: data_actions.iter().map(|s| s.to_string()).collect(),
        assignable_roles: None,
        builtin: true,
    }
}

/// Key Vault's data-plane built-in roles (secrets part) and Coffer's own.
pub fn builtin_roles() -> Vec<RoleDefinition> {
    let kv_read = ["Microsoft.KeyVault/vaults/read", "Microsoft.KeyVault/vaults/*/read"];
    vec![
        role(
            KEY_VAULT_ADMINISTRATOR,
            "Key Vault Administrator",
            "Perform all data plane operations on a key vault and all objects in it.",
            &kv_read,
            &["Microsoft.KeyVault/vaults/*"],
        ),
        role(
            KEY_VAULT_SECRETS_OFFICER,
            "Key Vault Secrets Officer",
            "Perform any action on the secrets of a key vault, except manage permissions.",
            &kv_read,
            &["Microsoft.KeyVault/vaults/secrets/*"],
        ),
        role(
            KEY_VAULT_SECRETS_USER,
            "Key Vault Secrets User",
            "Read secret contents.",
            &[],
            &[
                "Microsoft.KeyVault/vaults/secrets/getSecret/action",
                "Microsoft.KeyVault/vaults/secrets/readMetadata/action",
            ],
        ),
        role(
            KEY_VAULT_READER,
            "Key Vault Reader",
            "Read metadata of key vaults and their secrets; cannot read secret contents.",
            &kv_read,
            &["Microsoft.KeyVault/vaults/*/read", "Microsoft.KeyVault/vaults/secrets/readMetadata/action"],
        ),
        role(
            KEY_VAULT_PURGE_OPERATOR,
            "Key Vault Purge Operator",
            "Allows permanent deletion of soft-deleted vaults (no access to secrets).",
            &["Microsoft.KeyVault/locations/deletedVaults/purge/action"],
            &[],
        ),
        RoleDefinition {
            assignable_roles: Some(KEY_VAULT_ROLES.iter().map(|s| s.to_string()).collect()),
            ..role(
                KEY_VAULT_DATA_ACCESS_ADMINISTRATOR,
                "Key Vault Data Access Administrator",
                "Manage access to key vaults by adding or removing role assignments of the Key Vault roles.",
                &[
                    "Microsoft.Authorization/roleAssignments/write",
                    "Microsoft.Authorization/roleAssignments/delete",
                    "Microsoft.Authorization/*/read",
                    "Microsoft.KeyVault/vaults/read",
                ],
                &[],
            )
        },
        role(
            COFFER_ADMINISTRATOR,
            "Coffer Administrator",
            "Everything, on the whole server.",
            &["*"],
            &["*"],
        ),
        role(
            COFFER_IDENTITY_OPERATOR,
            "Coffer Identity Operator",
            "Create and manage identities, service principals, users, groups and bindings.",
            &["Coffer/principals/*"],
            &[],
        ),
    ]
}

/// A role given to a principal (or group) at a scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleAssignment {
    pub id: String,
    pub principal_id: String,
    pub role_id: String,
    pub scope: Scope,
}

/// Why access was granted (recorded with the request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant<'a> {
    pub role: &'a str,
    pub assignment_id: &'a str,
}

/// Why access was denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub action: Action,
    pub reason: Cow<'static, str>,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Caller is not authorized to perform action on resource. Action: '{}'. {}",
            self.action.name(),
            self.reason
        )
    }
}

struct CompiledRole {
    def: RoleDefinition,
    mask: u32,
}

/// An immutable snapshot of roles, assignments and group memberships. Rebuilt whenever any of
/// them changes, so a revocation applies to the very next request.
#[derive(Default)]
pub struct Rbac {
    roles: HashMap<String, CompiledRole>,
    assignments: HashMap<String, Vec<RoleAssignment>>,
    groups_of: HashMap<String, Vec<String>>,
}

impl Rbac {
    /// `memberships` are (group id, member id) pairs.
    pub fn new(
        roles: Vec<RoleDefinition>,
        assignments: Vec<RoleAssignment>,
        memberships: Vec<(String, String)>,
    ) -> Self {
        let roles = roles
            .into_iter()
            .map(|def| (def.id.clone(), CompiledRole { mask: def.compile(), def }))
            .collect();
        let mut by_principal: HashMap<String, Vec<RoleAssignment>> = HashMap::new();
        for a in assignments {
            by_principal.entry(a.principal_id.clone()).or_default().push(a);
        }
        let mut groups_of: HashMap<String, Vec<String>> = HashMap::new();
        for (group, member) in memberships {
            groups_of.entry(member).or_default().push(group);
        }
        Self { roles, assignments: by_principal, groups_of }
    }

    pub fn role(&self, id: &str) -> Option<&RoleDefinition> {
        self.roles.get(id).map(|r| &r.def)
    }

    pub fn roles(&self) -> impl Iterator<Item = &RoleDefinition> {
        self.roles.values().map(|r| &r.def)
    }

    /// Decides whether `principal` may perform `action` on `resource`.
    pub fn authorize<'a>(
        &'a self,
        principal: &Principal,
        action: Action,
        resource: Resource<'_>,
    ) -> Result<Grant<'a>, Denial> {
        self.authorize_with(principal, action, resource, |_| true)
    }

    /// Like [`Rbac::authorize`] for a role-assignment change of `target_role`: a grant from a
    /// role with `assignable_roles` counts only if `target_role` is among them.
    pub fn authorize_assignment<'a>(
        &'a self,
        principal: &Principal,
        action: Action,
        resource: Resource<'_>,
        target_role: &str,
    ) -> Result<Grant<'a>, Denial> {
        self.authorize_with(principal, action, resource, |role| {
            role.def.assignable_roles.as_ref().is_none_or(|allowed| allowed.iter().any(|r| r == target_role))
        })
    }

    fn authorize_with<'a>(
        &'a self,
        principal: &Principal,
        action: Action,
        resource: Resource<'_>,
        condition: impl Fn(&CompiledRole) -> bool,
    ) -> Result<Grant<'a>, Denial> {
        if !principal.enabled {
            return Err(Denial { action, reason: "The principal is disabled.".into() });
        }
        for assignment in self.assignments_of(&principal.object_id) {
            let Some(role) = self.roles.get(&assignment.role_id) else { continue };
            if role.mask & action.bit() != 0 && assignment.scope.covers(resource) && condition(role) {
                return Ok(Grant { role: &role.def.name, assignment_id: &assignment.id });
            }
        }
        Err(Denial { action, reason: "No role assignment grants it at this scope.".into() })
    }

    /// Decides whether `caller` may change a principal: its credentials (secrets, passwords,
    /// certificates, join tokens), federated credentials, group memberships, bindings, enabled
    /// state or existence. `conferring` lists the principals whose permissions the change puts
    /// within someone's reach: the target itself (for a group, the group), and for an agent
    /// every identity bound to it, since an agent can get their tokens.
    ///
    /// Besides `Coffer/principals/write` on the server, the caller must already hold every
    /// permission those principals hold (directly or through their groups), each at a scope
    /// covering the one it is held at, with an `assignable_roles` condition no wider than the
    /// caller's. Otherwise managing credentials would be a way to become anyone: add a secret
    /// to the administrator and sign in as it.
    pub fn authorize_principal_change<'a>(
        &'a self,
        caller: &Principal,
        conferring: &[&str],
    ) -> Result<Grant<'a>, Denial> {
        let grant = self.authorize(caller, Action::PrincipalWrite, Resource::Server)?;
        for target in conferring {
            for assignment in self.assignments_of(target) {
                let Some(role) = self.roles.get(&assignment.role_id) else { continue };
                self.holds_role_at(caller, role, &assignment.scope).map_err(|action| Denial {
                    action,
                    reason: format!(
                        "The principal being changed holds this permission at scope '{}' and the caller \
                         does not: only a caller that already holds every permission of a principal may \
                         change its credentials, federation, memberships, bindings, state or existence. \
                         Ask a Coffer Administrator.",
                        assignment.scope
                    )
                    .into(),
                })?;
            }
        }
        Ok(grant)
    }

    /// Decides whether `caller` may give `assignee` the role `role_id` at `scope` (or, for
    /// [`Action::RoleAssignmentDelete`], take it away): [`Rbac::authorize_assignment`], and a
    /// caller giving a role to itself or to one of its groups must already hold all of it there.
    /// A role that may assign roles (Key Vault Data Access Administrator) is meant to grant
    /// access to others, not to raise its holder.
    pub fn authorize_role_assignment<'a>(
        &'a self,
        caller: &Principal,
        action: Action,
        scope: &Scope,
        role_id: &str,
        assignee: &str,
    ) -> Result<Grant<'a>, Denial> {
        let grant = self.authorize_assignment(caller, action, scope.as_resource(), role_id)?;
        let own_groups = self.groups_of.get(caller.object_id.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        let to_itself = assignee == caller.object_id || own_groups.iter().any(|g| g == assignee);
        if action == Action::RoleAssignmentWrite && to_itself {
            let Some(role) = self.roles.get(role_id) else {
                return Err(Denial { action, reason: "The role does not exist.".into() });
            };
            self.holds_role_at(caller, role, scope).map_err(|missing| Denial {
                action: missing,
                reason: format!(
                    "A principal cannot give itself (or a group it is in) a role at scope '{scope}' with \
                     permissions it does not hold there. Ask another administrator to assign it."
                )
                .into(),
            })?;
        }
        Ok(grant)
    }

    /// The assignments that give `principal` its permissions: its own and its groups'.
    fn assignments_of<'a>(&'a self, principal: &str) -> impl Iterator<Item = &'a RoleAssignment> + 'a {
        let of = |id: &str| self.assignments.get(id).map(Vec::as_slice).unwrap_or(&[]);
        let groups = self.groups_of.get(principal).map(Vec::as_slice).unwrap_or(&[]);
        of(principal).iter().chain(groups.iter().flat_map(move |g| of(g).iter()))
    }

    /// Does `caller` hold every action of `role` at a scope covering `scope`? The first action
    /// it lacks otherwise.
    fn holds_role_at(&self, caller: &Principal, role: &CompiledRole, scope: &Scope) -> Result<(), Action> {
        for action in Action::ALL.into_iter().filter(|a| role.mask & a.bit() != 0) {
            let no_wider = |held: &CompiledRole| {
                !action.is_assignment_change()
                    || match (&role.def.assignable_roles, &held.def.assignable_roles) {
                        (_, None) => true,
                        (None, Some(_)) => false,
                        (Some(wanted), Some(allowed)) => wanted.iter().all(|r| allowed.contains(r)),
                    }
            };
            self.authorize_with(caller, action, scope.as_resource(), no_wider).map_err(|_| action)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
