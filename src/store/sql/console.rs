//! [`ConsoleStore`] on SQL: operator accounts and console sessions.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;

use super::SqlStore;
use super::codec::{from_ms, ms};
use crate::store::{ConsoleSession, ConsoleStore, StoreResult};

#[async_trait]
impl ConsoleStore for SqlStore {
    async fn create_operator(&self, name: &str, password_hash: &str) -> StoreResult<bool> {
        let r = sqlx::query(
            "INSERT INTO operators (name, password_hash, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(password_hash)
        .bind(ms(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn operator_password(&self, name: &str) -> StoreResult<Option<String>> {
        let row = sqlx::query("SELECT password_hash FROM operators WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("password_hash")).transpose()?)
    }

    async fn operators(&self) -> StoreResult<Vec<(String, DateTime<Utc>)>> {
        let rows = sqlx::query("SELECT name, created_at FROM operators ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("name")?, from_ms(r.try_get("created_at")?))))
            .collect()
    }

    async fn set_operator_password(&self, name: &str, password_hash: &str) -> StoreResult<bool> {
        let r = sqlx::query("UPDATE operators SET password_hash = $1 WHERE name = $2")
            .bind(password_hash)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn delete_operator(&self, name: &str) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM console_sessions WHERE operator = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let r = sqlx::query("DELETE FROM operators WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() == 1)
    }

    async fn create_session(&self, s: &ConsoleSession) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO console_sessions (token_hash, operator, credential, csrf, created_at, seen_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&s.token_hash)
        .bind(&s.operator)
        .bind(&s.credential)
        .bind(&s.csrf)
        .bind(ms(s.created_at))
        .bind(ms(s.seen_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn session(&self, token_hash: &str) -> StoreResult<Option<(ConsoleSession, Option<String>)>> {
        let row = sqlx::query(
            "SELECT s.token_hash, s.operator, s.credential, s.csrf, s.created_at, s.seen_at, o.password_hash \
             FROM console_sessions s LEFT JOIN operators o ON o.name = s.operator WHERE s.token_hash = $1",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok((
                ConsoleSession {
                    token_hash: r.try_get("token_hash")?,
                    operator: r.try_get("operator")?,
                    credential: r.try_get("credential")?,
                    csrf: r.try_get("csrf")?,
                    created_at: from_ms(r.try_get("created_at")?),
                    seen_at: from_ms(r.try_get("seen_at")?),
                },
                r.try_get::<Option<String>, _>("password_hash")?,
            ))
        })
        .transpose()
    }

    async fn touch_session(&self, token_hash: &str, at: DateTime<Utc>) -> StoreResult<()> {
        sqlx::query("UPDATE console_sessions SET seen_at = $1 WHERE token_hash = $2")
            .bind(ms(at))
            .bind(token_hash)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn delete_session(&self, token_hash: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM console_sessions WHERE token_hash = $1")
            .bind(token_hash)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn purge_sessions(
        &self,
        idle_before: DateTime<Utc>,
        created_before: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let r = sqlx::query("DELETE FROM console_sessions WHERE seen_at < $1 OR created_at < $2")
            .bind(ms(idle_before))
            .bind(ms(created_before))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}
