//! Token issuance for managed identities, on behalf of an agent that attested the calling
//! process. Shared by the remote agent endpoint (`/coffer/agents/token`) and the dev server's
//! in-process agent.

use std::sync::Arc;

use async_trait::async_trait;
use coffer_agent::{BrokerError, BrokerRequest, BrokeredToken, TokenBroker};
use coffer_core::authz::PrincipalKind;
use coffer_core::identity::ProcessFacts;
use zeroize::Zeroizing;

use crate::api::AppState;

/// Issues a token for the identity bound to `request.process` on the agent `agent_id`.
pub fn issue_for_agent(
    state: &AppState,
    agent_id: &str,
    request: &BrokerRequest,
) -> Result<BrokeredToken, BrokerError> {
    let audience = state.tokens.audience();
    if request.resource.trim_end_matches('/') != audience {
        return Err(BrokerError::BadRequest(format!(
            "The resource '{}' is not served here; use '{audience}'.",
            request.resource
        )));
    }
    let snapshot = state.directory.snapshot();
    let agent = snapshot.principal(agent_id).filter(|a| a.kind == PrincipalKind::Agent && a.enabled);
    if agent.is_none() {
        return Err(BrokerError::NotBound("The agent is disabled or unknown.".into()));
    }
    let p = &request.process;
    let mut matched: Vec<&coffer_core::authz::Principal> = snapshot
        .bindings
        .iter()
        .filter(|b| b.agent_id == agent_id && b.matches(p))
        .filter_map(|b| snapshot.principal(&b.identity_id))
        .filter(|i| i.kind == PrincipalKind::ManagedIdentity && i.enabled)
        .collect();
    matched.sort_by(|a, b| a.object_id.cmp(&b.object_id));
    matched.dedup_by(|a, b| a.object_id == b.object_id);
    let wanted = request.client_id.as_deref().or(request.object_id.as_deref());
    let identity =
        match wanted {
            Some(id) => {
                matched.into_iter().find(|i| i.client_id == id || i.object_id == id).ok_or_else(|| {
                    BrokerError::NotBound(format!(
                    "The managed identity '{id}' is not bound to this process (pid {}, uid {}, exe {}).{}",
                    p.pid,
                    p.uid,
                    p.exe,
                    unverified(p)
                ))
                })?
            }
            None => match matched.as_slice() {
                [one] => *one,
                [] => {
                    return Err(BrokerError::NotBound(format!(
                        "No managed identity is bound to this process (pid {}, uid {}, gid {}, exe {}).{}",
                        p.pid,
                        p.uid,
                        p.gid,
                        p.exe,
                        unverified(p)
                    )))
                }
                _ => return Err(BrokerError::BadRequest(
                    "Several managed identities are bound to this process; choose one with AZURE_CLIENT_ID."
                        .into(),
                )),
            },
        };
    let (token, claims) = state.tokens.issue_attested(
        &identity.object_id,
        state.tokens.lifetime_secs(),
        agent.map(|a| a.display_name.clone()),
        Some(request.process.clone()),
    );
    Ok(BrokeredToken {
        access_token: Zeroizing::new(token),
        expires_on: claims.exp,
        resource: audience.to_owned(),
        client_id: identity.client_id.clone(),
    })
}

/// Why attested facts may match fewer bindings than they seem to, for the refusal's message.
fn unverified(p: &ProcessFacts) -> String {
    let mut why = String::new();
    if !p.ids_consistent {
        why.push_str(" Its real, effective and saved ids differ (a setuid program): it matches no binding.");
    }
    if !p.same_namespaces {
        why.push_str(
            " It runs in another user or mount namespace than the agent: only bindings made with \
             --allow-namespaced match it.",
        );
    }
    if !p.exe_verified {
        why.push_str(
            " Its executable is not the file at that path on the host (another namespace's file, or \
             deleted or replaced since it started; restart it): no --exe binding matches it.",
        );
    }
    why
}

/// The dev server's in-process agent: trusted like a joined agent, without the network hop.
pub struct LocalBroker {
    pub state: Arc<AppState>,
    pub agent_id: String,
}

#[async_trait]
impl TokenBroker for LocalBroker {
    async fn token(&self, request: BrokerRequest) -> Result<BrokeredToken, BrokerError> {
        issue_for_agent(&self.state, &self.agent_id, &request)
    }
}
