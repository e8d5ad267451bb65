//! Identity domain types: what a host agent attests about a calling process, how an
//! administrator binds a managed identity to such facts, and federated credentials.

use serde::{Deserialize, Serialize};

/// Facts the agent reads from the kernel about the process on the other end of a loopback
/// connection. Nothing here comes from the process itself.
///
/// The three flags say which facts a process cannot have borrowed. They default to `false` when
/// missing (facts from an agent older than the flags), so such facts match no binding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessFacts {
    pub pid: u32,
    /// The real uid and gid (the only ones when `ids_consistent`).
    pub uid: u32,
    pub gid: u32,
    /// Real, effective, saved and filesystem uids are all equal, and so are the gids. False in
    /// a setuid program mid-flight (`su` at its prompt: real uid of its caller, effective 0),
    /// whose privileges belong to neither uid.
    #[serde(default)]
    pub ids_consistent: bool,
    /// The path of the running executable, as `/proc/PID/exe` shows it.
    pub exe: String,
    /// The file at `exe` in the agent's own mount namespace is the running file (same device
    /// and inode). False when another namespace shows a different file under that path, or when
    /// the file was deleted or replaced since it was started.
    #[serde(default)]
    pub exe_verified: bool,
    /// The process shares the agent's user and mount namespaces.
    #[serde(default)]
    pub same_namespaces: bool,
    /// The process's cgroup path (cgroup v2 line, or the systemd hierarchy in v1).
    pub cgroup: Option<String>,
    /// The systemd unit (`*.service` / `*.scope`) derived from the cgroup, if any.
    pub unit: Option<String>,
}

impl ProcessFacts {
    /// True when `other` is attested as the same thing (every fact but the pid): processes that
    /// share one socket must, or none of them is attested.
    pub fn same_attested_facts(&self, other: &ProcessFacts) -> bool {
        ProcessFacts { pid: other.pid, ..self.clone() } == *other
    }
}

/// Binds a managed identity to the processes of one agent's host that match every selector
/// given (AND). At least one selector is required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub id: String,
    pub identity_id: String,
    pub agent_id: String,
    pub uid: Option<u32>,
    pub exe: Option<String>,
    pub unit: Option<String>,
    pub cgroup_prefix: Option<String>,
    /// Also match processes in another user or mount namespace than the agent's (containers,
    /// `unshare`). Off by default: inside its own namespaces a process chooses what its paths
    /// show, and uid and cgroup selectors mean less there.
    #[serde(default)]
    pub allow_namespaced: bool,
}

impl Binding {
    pub fn has_selector(&self) -> bool {
        self.uid.is_some() || self.exe.is_some() || self.unit.is_some() || self.cgroup_prefix.is_some()
    }

    /// True when every selector given matches `facts` (and there is at least one).
    ///
    /// A process whose ids are not consistent (mid-setuid) matches nothing; an executable
    /// matches only when verified; another namespace only when the binding allows it.
    pub fn matches(&self, facts: &ProcessFacts) -> bool {
        self.has_selector()
            && facts.ids_consistent
            && (facts.same_namespaces || self.allow_namespaced)
            && self.uid.is_none_or(|uid| uid == facts.uid)
            && self.exe.as_deref().is_none_or(|exe| facts.exe_verified && exe == facts.exe)
            && self.unit.as_deref().is_none_or(|unit| facts.unit.as_deref() == Some(unit))
            && self
                .cgroup_prefix
                .as_deref()
                .is_none_or(|prefix| facts.cgroup.as_deref().is_some_and(|c| c.starts_with(prefix)))
    }
}

/// Trust in an outside OIDC issuer for one principal, like Entra's federated identity
/// credentials: a token from `issuer` with subject `subject` and audience `audience` stands
/// for the principal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FederatedCredential {
    pub id: String,
    pub principal_id: String,
    pub issuer: String,
    pub subject: String,
    pub audience: String,
    /// Where the issuer's keys come from: a JWKS URL, or a JWKS document given inline.
    pub jwks_url: Option<String>,
    pub jwks: Option<String>,
}

/// Entra's default audience for federated tokens.
pub const DEFAULT_FEDERATION_AUDIENCE: &str = "api://AzureADTokenExchange";

/// A stored credential of a principal. `material` is an Argon2id PHC hash (secrets, passwords,
/// join tokens) or a PEM certificate; never a usable secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRecord {
    pub id: String,
    pub principal_id: String,
    pub kind: CredentialKind,
    pub material: String,
    pub created: i64,
    pub expires: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    ClientSecret,
    Certificate,
    Password,
    JoinToken,
}

impl CredentialKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::ClientSecret => "client-secret",
            Self::Certificate => "certificate",
            Self::Password => "password",
            Self::JoinToken => "join-token",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "client-secret" => Self::ClientSecret,
            "certificate" => Self::Certificate,
            "password" => Self::Password,
            "join-token" => Self::JoinToken,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> ProcessFacts {
        ProcessFacts {
            pid: 10,
            uid: 1000,
            gid: 1000,
            ids_consistent: true,
            exe: "/usr/bin/python3".into(),
            exe_verified: true,
            same_namespaces: true,
            cgroup: Some("/system.slice/app.service".into()),
            unit: Some("app.service".into()),
        }
    }

    fn binding() -> Binding {
        Binding {
            id: "b".into(),
            identity_id: "i".into(),
            agent_id: "a".into(),
            uid: None,
            exe: None,
            unit: None,
            cgroup_prefix: None,
            allow_namespaced: false,
        }
    }

    #[test]
    fn selectors_combine_with_and() {
        assert!(!binding().matches(&facts()), "a binding without selectors matches nothing");
        assert!(Binding { uid: Some(1000), ..binding() }.matches(&facts()));
        assert!(!Binding { uid: Some(1001), ..binding() }.matches(&facts()));
        let both = Binding { uid: Some(1000), exe: Some("/usr/bin/python3".into()), ..binding() };
        assert!(both.matches(&facts()));
        let wrong_exe = Binding { uid: Some(1000), exe: Some("/usr/bin/node".into()), ..binding() };
        assert!(!wrong_exe.matches(&facts()));
        assert!(Binding { unit: Some("app.service".into()), ..binding() }.matches(&facts()));
        assert!(Binding { cgroup_prefix: Some("/system.slice/".into()), ..binding() }.matches(&facts()));
        assert!(!Binding { cgroup_prefix: Some("/user.slice/".into()), ..binding() }.matches(&facts()));
        let no_cgroup = ProcessFacts { cgroup: None, unit: None, ..facts() };
        assert!(!Binding { cgroup_prefix: Some("/".into()), ..binding() }.matches(&no_cgroup));
    }

    /// `su` at its prompt, run by uid 1000: real uid 1000, effective 0. It matches no binding,
    /// neither its caller's uid nor root's, nor any other selector.
    #[test]
    fn inconsistent_ids_match_nothing() {
        let mid_setuid = ProcessFacts { ids_consistent: false, exe: "/usr/bin/su".into(), ..facts() };
        assert!(!Binding { uid: Some(1000), ..binding() }.matches(&mid_setuid));
        assert!(!Binding { uid: Some(0), ..binding() }.matches(&mid_setuid));
        assert!(!Binding { exe: Some("/usr/bin/su".into()), ..binding() }.matches(&mid_setuid));
        assert!(!Binding { unit: Some("app.service".into()), ..binding() }.matches(&mid_setuid));
    }

    #[test]
    fn an_unverified_executable_matches_no_exe_selector() {
        let unverified = ProcessFacts { exe_verified: false, ..facts() };
        assert!(!Binding { exe: Some("/usr/bin/python3".into()), ..binding() }.matches(&unverified));
        let with_uid = Binding { uid: Some(1000), exe: Some("/usr/bin/python3".into()), ..binding() };
        assert!(!with_uid.matches(&unverified));
        assert!(Binding { uid: Some(1000), ..binding() }.matches(&unverified), "other selectors still work");
    }

    #[test]
    fn another_namespace_matches_only_bindings_that_allow_it() {
        let namespaced = ProcessFacts { same_namespaces: false, exe_verified: false, ..facts() };
        assert!(!Binding { uid: Some(1000), ..binding() }.matches(&namespaced));
        let allowed = Binding { uid: Some(1000), allow_namespaced: true, ..binding() };
        assert!(allowed.matches(&namespaced));
        let exe = Binding { exe: Some("/usr/bin/python3".into()), allow_namespaced: true, ..binding() };
        assert!(!exe.matches(&namespaced), "the flag does not vouch for the executable");
        assert!(exe.matches(&ProcessFacts { same_namespaces: false, ..facts() }));
    }

    /// Facts from an agent that predates the flags match nothing.
    #[test]
    fn facts_without_the_flags_are_unverified() {
        let old: ProcessFacts = serde_json::from_value(serde_json::json!({
            "pid": 1, "uid": 1000, "gid": 1000, "exe": "/usr/bin/python3", "cgroup": null, "unit": null
        }))
        .unwrap();
        assert!(!old.ids_consistent && !old.exe_verified && !old.same_namespaces);
        assert!(!Binding { uid: Some(1000), ..binding() }.matches(&old));
    }

    #[test]
    fn holders_compare_every_fact_but_the_pid() {
        assert!(facts().same_attested_facts(&ProcessFacts { pid: 11, ..facts() }));
        assert!(!facts().same_attested_facts(&ProcessFacts { ids_consistent: false, ..facts() }));
        assert!(!facts().same_attested_facts(&ProcessFacts { gid: 0, ..facts() }));
        assert!(!facts().same_attested_facts(&ProcessFacts { same_namespaces: false, ..facts() }));
        assert!(!facts().same_attested_facts(&ProcessFacts { cgroup: None, ..facts() }));
    }
}
