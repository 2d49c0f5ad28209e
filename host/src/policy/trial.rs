//! One rule's evaluation outside a [`PolicySet`](super::PolicySet), for `llmscope policy test`:
//! the same call, bounds and verdict checks as a rule of the gateway, minus the failure mode.

use llmscope_sdk::types::{RequestContext, Snapshot, Verdict};

use super::bindings;
use super::component::{InstancePool, LoadedComponent};

impl LoadedComponent {
    /// Evaluate `request` with `snapshot` under `settings_json` as a gateway rule would (fresh
    /// instance, the runtime's deadline and memory cap, texts truncated), then check the verdict
    /// against the request as the gateway does: a downgrade to a tier the route does not offer
    /// is an error, one to the requested tier an allow. The error is the rule error the gateway
    /// would record (before `failure_mode` turns it into a deny or an allow).
    pub fn evaluate_once(
        &self,
        settings_json: &str,
        request: &RequestContext,
        snapshot: &Snapshot,
    ) -> Result<Verdict, String> {
        let wit_request = bindings::request_to_wit(request);
        self.evaluate(
            &InstancePool::default(),
            settings_json,
            &wit_request,
            snapshot,
        )
        .map_err(|e| e.to_string())
        .and_then(|verdict| verdict.checked(request))
    }
}
