//! [`VersionStore`] on SQL: the files of each pipeline version served, one
//! JSON object per version, written once and never changed.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::Utc;
use sqlx::Row;

use super::SqlStore;
use super::codec::{ms, parse_json};
use crate::store::{StoreError, StoreResult, VersionStore};

#[async_trait]
impl VersionStore for SqlStore {
    async fn save_pipeline_version(
        &self,
        version: &str,
        tipo: &str,
        sources: &BTreeMap<String, String>,
    ) -> StoreResult<()> {
        let text = serde_json::to_string(sources).map_err(|e| StoreError::Database(e.to_string()))?;
        sqlx::query(
            "INSERT INTO pipeline_versions (version, tipo, sources, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (version) DO NOTHING",
        )
        .bind(version)
        .bind(tipo)
        .bind(text)
        .bind(ms(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn pipeline_version(
        &self,
        version: &str,
    ) -> StoreResult<Option<(String, BTreeMap<String, String>)>> {
        let row = sqlx::query("SELECT tipo, sources FROM pipeline_versions WHERE version = $1")
            .bind(version)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let files = parse_json(&r.try_get::<String, _>("sources")?)?;
            Ok((r.try_get("tipo")?, files))
        })
        .transpose()
    }
}
