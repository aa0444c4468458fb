//! The OpenAPI 3.1 document (utoipa) and Swagger UI, served by the binary.

use serde_json::{Value, json};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityRequirement, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

use super::{admin, auth, destinations, dry_run, error, events, ops, retention};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Event Orchestrator",
        description = "B2B partners send business events; YAML pipelines validate, enrich, route and deliver them.",
    ),
    paths(
        events::create_event,
        events::create_batch,
        events::list_events,
        events::stats,
        events::get_event,
        events::get_status,
        events::retry_event,
        events::discard_event,
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
        retention::get_retention,
        retention::purge_now,
        destinations::list_destinations,
        destinations::reset_destination,
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

/// `/api`: Swagger UI, assets embedded, reading `/api/openapi.json`.
pub fn swagger<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    SwaggerUi::new("/api")
        .config(utoipa_swagger_ui::Config::from("/api/openapi.json"))
        .into()
}

/// `GET /api/openapi.json`: the document, with the event types loaded now.
pub async fn openapi_json(
    axum::extract::State(state): axum::extract::State<super::AppState>,
) -> axum::Json<Value> {
    axum::Json(document(&state.pipelines.current()))
}

/// The OpenAPI document: the annotated routes, the house conventions every
/// route shares (problem+json errors, the statuses any route can answer),
/// and one request schema per loaded event type, so clients and tools such
/// as schemathesis see what `POST /events` really accepts.
pub fn document(set: &engine::PipelineSet) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    conventions(&mut doc);
    event_types(&mut doc, set);
    doc
}

fn problem(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    })
}

fn reason(code: &str) -> &'static str {
    code.parse::<u16>()
        .ok()
        .and_then(|c| axum::http::StatusCode::from_u16(c).ok())
        .and_then(|c| c.canonical_reason())
        .unwrap_or("Response")
}

fn conventions(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in item.iter_mut() {
            if !["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                continue;
            }
            let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
            let has_body = op.get("requestBody").is_some();
            if path == "/admin/dead-letters/redrive" || path == "/admin/partners/{id}/keys" {
                op["requestBody"]["required"] = json!(false);
            }
            let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
                continue;
            };
            for (code, resp) in responses.iter_mut() {
                if resp
                    .get("description")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    resp["description"] = json!(reason(code));
                }
                let is_error = code.as_str() >= "400";
                if let (true, Some(content)) =
                    (is_error, resp.get_mut("content").and_then(Value::as_object_mut))
                    && let Some(json_body) = content.remove("application/json")
                {
                    content.insert("application/problem+json".into(), json_body);
                }
            }
            let mut add = |code: &str, description: &str| {
                responses.entry(code).or_insert_with(|| problem(description));
            };
            add(
                "429",
                "Too many requests: the client IP's, the partner's or the login limit (see Retry-After)",
            );
            add(
                "503",
                "The store or the queue is unavailable, or the request took too long",
            );
            if secured {
                add("401", "Missing, wrong, expired or revoked credentials");
            }
            if path.starts_with("/admin/") {
                add("403", "The route needs the admin role");
            }
            if (path == "/events" || path == "/events/batch") && method == "post" {
                add("403", "Events are sent by partners, not with the admin key");
            }
            if has_body {
                add(
                    "400",
                    "Malformed JSON, or JSON beyond a limit (depth, string size, items)",
                );
                add("413", "The body is larger than the limit");
                add("415", "The content type is not application/json");
                add("422", "The body is JSON of the wrong shape");
            }
            if path.contains('{') {
                add("404", "No such resource (or not visible to this caller)");
            }
        }
    }
}

/// A component name for an event type: ASCII letters, digits and `_`.
fn component_name(tipo: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    let ascii: String = tipo
        .nfd()
        .filter(char::is_ascii)
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("Event_{ascii}")
}

fn event_types(doc: &mut Value, set: &engine::PipelineSet) {
    let mut one_of = Vec::new();
    for p in set.pipelines() {
        let mut dados = (*p.schema_json).clone();
        if let Some(obj) = dados.as_object_mut() {
            // Resolution keywords of the stand-alone file; meaningless here.
            obj.remove("$schema");
            obj.remove("$id");
        }
        let mut name = component_name(&p.event_type);
        while doc["components"]["schemas"].get(&name).is_some() {
            name.push('_');
        }
        doc["components"]["schemas"][&name] = json!({
            "title": format!("{} event", p.event_type),
            "description": p.description.clone().unwrap_or_default(),
            "type": "object",
            "required": ["tipo", "dados"],
            "additionalProperties": false,
            "properties": {
                "tipo": {"const": p.event_type},
                "dados": dados,
            },
        });
        one_of.push(json!({"$ref": format!("#/components/schemas/{name}")}));
    }
    if let Some(params) = doc["paths"]["/events"]["post"]
        .as_object_mut()
        .map(|op| op.entry("parameters").or_insert_with(|| json!([])))
        .and_then(Value::as_array_mut)
    {
        params.retain(|p| {
            !p["name"]
                .as_str()
                .is_some_and(|n| n.eq_ignore_ascii_case("Idempotency-Key"))
        });
        params.push(json!({
            "name": "Idempotency-Key",
            "in": "header",
            "required": false,
            "description": "Makes the POST safe to repeat: the same key with the same body answers 200 with the \
                            original event; with another body, 409. Per partner; a key lives exactly as long as \
                            its event: once the retention purge has removed the event, the key makes a new \
                            one. An empty value is no key.",
            "schema": {"type": "string", "pattern": "^[!-~]{0,255}$"},
        }));
    }
    if !one_of.is_empty() {
        doc["paths"]["/events"]["post"]["requestBody"]["content"]["application/json"]["schema"] =
            json!({"oneOf": one_of});
    }
}
