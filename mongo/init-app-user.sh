# Runs once, when the mongo container initialises an empty data volume (the official
# image sources /docker-entrypoint-initdb.d/*.sh then, against a temporary server
# without access control). Creates the pipeline's application user with readWrite on
# its database only; the persister and readings log in with it, never as root.
# Credentials come from the environment (.env), read by mongosh, never echoed.
: "${MONGO_APP_USERNAME:?set MONGO_APP_USERNAME in .env}"
: "${MONGO_APP_PASSWORD:?set MONGO_APP_PASSWORD in .env}"
"${mongo[@]}" admin --eval '
  const name = process.env.MONGODB_DATABASE || "iot";
  db.getSiblingDB(name).createUser({
    user: process.env.MONGO_APP_USERNAME,
    pwd: process.env.MONGO_APP_PASSWORD,
    roles: [{ role: "readWrite", db: name }],
  });
  print("created the application user " + process.env.MONGO_APP_USERNAME + " on " + name);
'
