# Multi-stage build: compile in the Rust image, run on a slim Debian as a
# non-root user. Migrations, Swagger assets and the shipped pipelines come
# with the image; mount your own PIPELINES_DIR/SCHEMAS_DIR to replace them.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin orchestrator \
 && strip target/release/orchestrator

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin orchestrator \
 && mkdir -p /app/data \
 && chown orchestrator /app/data
WORKDIR /app
COPY --from=build /src/target/release/orchestrator /usr/local/bin/orchestrator
COPY pipelines ./pipelines
COPY schemas ./schemas
USER orchestrator
ENV LISTEN_ADDR=0.0.0.0:3000 \
    DATA_DIR=/app/data \
    PIPELINES_DIR=/app/pipelines \
    SCHEMAS_DIR=/app/schemas
EXPOSE 3000
ENTRYPOINT ["orchestrator"]
CMD ["serve"]
