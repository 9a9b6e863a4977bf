// A loopback OAuth2 authorization server for exmta's XOAUTH2 tests (../oidc.py starts it).
// Clients come from CLIENTS_JSON (a file): client_credentials with client_secret_post or
// private_key_jwt (RS256). Tokens are opaque, for the Exchange Online resource, with an
// "email" claim that Dovecot's introspection matches against the XOAUTH2 user.
// Environment: PORT, CLIENTS_JSON, TOKEN_TTL (seconds), TOKEN_EMAIL, TOKEN_LOG (issued tokens, one a line,
// so that the tests can look for them in exmta's logs and on the wire; also grant errors as "! error").
import Provider from 'oidc-provider';
import { appendFileSync, readFileSync } from 'node:fs';

const port = Number(process.env.PORT);
const issuer = `http://127.0.0.1:${port}`;
const RESOURCE = 'https://outlook.office365.com';
const SCOPE = 'https://outlook.office365.com/.default';
const ttl = Number(process.env.TOKEN_TTL || 3600);
const email = process.env.TOKEN_EMAIL || 'relay@example.test';
const clients = JSON.parse(readFileSync(process.env.CLIENTS_JSON, 'utf8'));

const provider = new Provider(issuer, {
  clients,
  clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt'],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true, allowedPolicy: async () => true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => RESOURCE,
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({ scope: SCOPE, audience: RESOURCE, accessTokenFormat: 'opaque', accessTokenTTL: ttl }),
    },
  },
  extraTokenClaims: async (ctx, token) => (token.kind === 'ClientCredentials' ? { email } : undefined),
});
if (process.env.TOKEN_LOG) {
  provider.on('client_credentials.saved', (token) => appendFileSync(process.env.TOKEN_LOG, `${token.jti}\n`));
  provider.on('grant.error', (ctx, error) => appendFileSync(process.env.TOKEN_LOG, `! ${error.error}\n`));
}
provider.listen(port, '127.0.0.1', () => console.log(`oidc-provider listening on ${issuer}`));
