//! The OpenAPI 3.1 document (utoipa) and Swagger UI, served by the binary.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityRequirement, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

use super::{admin, auth, dry_run, error, events, ops};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Event Orchestrator",
        description = "B2B partners send business events; YAML pipelines validate, enrich, route and deliver them.",
    ),
    paths(
        events::create_event,
        events::list_events,
        events::stats,
        events::get_event,
        events::get_status,
        events::retry_event,
        dry_run::dry_run,
        auth::login,
        ops::health,
        ops::metrics,
        ops::list_pipelines,
        ops::reload_pipelines,
        admin::list_partners,
        admin::create_partner,
        admin::get_partner,
        admin::update_partner,
        admin::create_key,
        admin::revoke_key,
        admin::redrive,
    ),
    components(schemas(error::Problem, error::FieldError)),
    modifiers(&Security),
    tags(
        (name = "events", description = "Partners send and follow events"),
        (name = "auth", description = "Bearer tokens for partners"),
        (name = "pipelines", description = "Integrators try pipelines"),
        (name = "admin", description = "Operators manage pipelines and partners (admin role: ADMIN_API_KEY)"),
        (name = "operations", description = "Health and metrics"),
    )
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-API-Key",
                "A partner's API key, or the operator's ADMIN_API_KEY",
            ))),
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                utoipa::openapi::security::HttpBuilder::new()
                    .scheme(utoipa::openapi::security::HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        // Who may call what, in one place: `/admin/*` takes the operator's
        // key; the partner routes take a partner's key or token (or the
        // operator's key); login, health, metrics and the docs take nothing.
        for (path, item) in openapi.paths.paths.iter_mut() {
            let requirement: Vec<SecurityRequirement> = if path.starts_with("/admin/") {
                vec![SecurityRequirement::new::<_, _, String>("api_key", [])]
            } else if path.starts_with("/events") || path.starts_with("/pipelines/") {
                vec![
                    SecurityRequirement::new::<_, _, String>("api_key", []),
                    SecurityRequirement::new::<_, _, String>("bearer", []),
                ]
            } else {
                continue;
            };
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                op.security = Some(requirement.clone());
            }
        }
    }
}

/// `/api` (Swagger UI, assets embedded) and `/api/openapi.json`.
pub fn swagger<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    SwaggerUi::new("/api")
        .url("/api/openapi.json", ApiDoc::openapi())
        .into()
}
