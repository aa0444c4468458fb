//! [`PartnerStore`] on SQL: partners and their API keys. Keys are stored by
//! hash only; the per-request key lookup is answered from the process's
//! cache ([`key_cache`](super::key_cache)) or group-committed with the event
//! path's writes (see [`Writes`](super::writes::Writes)). A change made here
//! drops this process's cache at once; other processes drop theirs within
//! [`FRESH`](super::key_cache::FRESH).

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::Utc;
use sqlx::Row;

use super::SqlStore;
use super::codec::{from_ms, ms, partner_from_row};
use super::statement::query_filtered;
use crate::store::{ApiKeyInfo, NewPartner, Partner, PartnerInfo, PartnerStore, PartnerUpdate, StoreResult};

#[async_trait]
impl PartnerStore for SqlStore {
    async fn create_partner(&self, p: &NewPartner) -> StoreResult<bool> {
        let r = sqlx::query(
            "INSERT INTO partners (id, name, password_hash, rate_per_minute, burst, weight, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&p.id)
        .bind(&p.name)
        .bind(&p.password_hash)
        .bind(p.rate_per_minute.map(i64::from))
        .bind(p.burst.map(i64::from))
        .bind(i64::from(p.weight))
        .bind(ms(Utc::now()))
        .execute(&self.pool)
        .await?;
        self.key_cache.invalidate();
        Ok(r.rows_affected() == 1)
    }

    async fn add_api_key(&self, partner_id: &str, key_hash: &str, prefix: &str) -> StoreResult<bool> {
        let r = sqlx::query(
            "INSERT INTO api_keys (key_hash, partner_id, prefix, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (key_hash) DO NOTHING",
        )
        .bind(key_hash)
        .bind(partner_id)
        .bind(prefix)
        .bind(ms(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn partner_by_key_hash(&self, key_hash: &str) -> StoreResult<Option<Partner>> {
        let ticket = match self.key_cache.key(&self.pool, key_hash) {
            Ok(p) => return Ok(Some(p)),
            Err(ticket) => ticket,
        };
        let found = self.writes.partner_by_key_hash(key_hash).await?;
        if let Some(p) = &found {
            self.key_cache.put_key(ticket, key_hash, p);
        }
        Ok(found)
    }

    async fn partner_login(&self, id: &str) -> StoreResult<Option<(Partner, Option<String>)>> {
        let ticket = match self.key_cache.login(&self.pool, id) {
            Ok(login) => return Ok(Some(login)),
            Err(ticket) => ticket,
        };
        let row = sqlx::query(
            "SELECT id, name, rate_per_minute, burst, disabled_at, password_hash FROM partners WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let login = row
            .map(|r| -> StoreResult<_> {
                Ok((
                    partner_from_row(&r)?,
                    r.try_get::<Option<String>, _>("password_hash")?,
                ))
            })
            .transpose()?;
        if let Some(l) = &login {
            self.key_cache.put_login(ticket, id, l);
        }
        Ok(login)
    }

    async fn count_partners(&self) -> StoreResult<i64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM partners")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }

    async fn partners(&self, id: Option<&str>) -> StoreResult<Vec<PartnerInfo>> {
        let filter = if id.is_some() { "WHERE id = $1" } else { "" };
        let sql = format!(
            "SELECT id, name, rate_per_minute, burst, weight, disabled_at, password_hash, created_at FROM partners \
             {filter} ORDER BY id"
        );
        let rows = query_filtered(sql, id).fetch_all(&self.pool).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let p = partner_from_row(r)?;
            out.push(PartnerInfo {
                has_password: r.try_get::<Option<String>, _>("password_hash")?.is_some(),
                created_at: from_ms(r.try_get("created_at")?),
                keys: Vec::new(),
                id: p.id,
                name: p.name,
                disabled: p.disabled,
                rate_per_minute: p.rate_per_minute,
                burst: p.burst,
                weight: u32::try_from(r.try_get::<i64, _>("weight")?).unwrap_or(1),
            });
        }
        let key_filter = if id.is_some() { "WHERE partner_id = $1" } else { "" };
        let sql = format!(
            "SELECT partner_id, key_hash, prefix, created_at, revoked_at FROM api_keys {key_filter} \
             ORDER BY partner_id, created_at, key_hash"
        );
        for r in query_filtered(sql, id).fetch_all(&self.pool).await? {
            let owner: String = r.try_get("partner_id")?;
            let hash: String = r.try_get("key_hash")?;
            if let Some(p) = out.iter_mut().find(|p| p.id == owner) {
                p.keys.push(ApiKeyInfo {
                    id: crate::credentials::key_id(&hash),
                    prefix: r.try_get("prefix")?,
                    created_at: from_ms(r.try_get("created_at")?),
                    revoked_at: r.try_get::<Option<i64>, _>("revoked_at")?.map(from_ms),
                });
            }
        }
        Ok(out)
    }

    async fn update_partner(&self, id: &str, update: &PartnerUpdate) -> StoreResult<bool> {
        // One statement, no read-modify-write: on SQLite a deferred
        // transaction that reads and then writes fails when a worker wrote in
        // between.
        let flag = |set: bool| i64::from(set);
        let disabled = match update.disabled {
            None => -1_i64,
            Some(false) => 0,
            Some(true) => 1,
        };
        let r = sqlx::query(
            "UPDATE partners SET \
               name = COALESCE(CAST($2 AS TEXT), name), \
               password_hash = CASE WHEN $3 = 1 THEN CAST($4 AS TEXT) ELSE password_hash END, \
               rate_per_minute = CASE WHEN $5 = 1 THEN CAST($6 AS BIGINT) ELSE rate_per_minute END, \
               burst = CASE WHEN $7 = 1 THEN CAST($8 AS BIGINT) ELSE burst END, \
               disabled_at = CASE WHEN $9 = 1 THEN COALESCE(disabled_at, $10) \
                                  WHEN $9 = 0 THEN NULL ELSE disabled_at END, \
               weight = COALESCE(CAST($11 AS BIGINT), weight) \
             WHERE id = $1",
        )
        .bind(id)
        .bind(update.name.clone())
        .bind(flag(update.password_hash.is_some()))
        .bind(update.password_hash.clone().flatten())
        .bind(flag(update.rate_per_minute.is_some()))
        .bind(update.rate_per_minute.flatten().map(i64::from))
        .bind(flag(update.burst.is_some()))
        .bind(update.burst.flatten().map(i64::from))
        .bind(disabled)
        .bind(ms(Utc::now()))
        .bind(update.weight.map(i64::from))
        .execute(&self.pool)
        .await?;
        self.key_cache.invalidate();
        Ok(r.rows_affected() == 1)
    }

    async fn partner_weights(&self) -> StoreResult<HashMap<String, u32>> {
        let rows = sqlx::query("SELECT id, weight FROM partners WHERE weight <> 1")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let w = u32::try_from(r.try_get::<i64, _>("weight")?).unwrap_or(1);
                Ok((r.try_get("id")?, w.max(1)))
            })
            .collect()
    }

    async fn revoke_api_keys(
        &self,
        partner_id: &str,
        key_id: Option<&str>,
        keep_hash: Option<&str>,
    ) -> StoreResult<u64> {
        let r = sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE partner_id = $2 AND revoked_at IS NULL \
             AND (CAST($3 AS TEXT) IS NULL OR substr(key_hash, 1, 16) = $3) \
             AND (CAST($4 AS TEXT) IS NULL OR key_hash <> $4)",
        )
        .bind(ms(Utc::now()))
        .bind(partner_id)
        .bind(key_id)
        .bind(keep_hash)
        .execute(&self.pool)
        .await?;
        self.key_cache.invalidate();
        Ok(r.rows_affected())
    }
}
