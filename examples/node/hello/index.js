// The Node.js hello function.
//
//   nimbus deploy examples/node/hello/index.js --name hello-js --runtime nodejs20 --handler index.handle
//   nimbus invoke hello-js --data '{"name": "Nimbus"}'

const GREETING = 'Hello'; // module-level init runs once per instance, not per call

exports.handle = async (event) => ({
  message: `${GREETING}, ${event?.name ?? 'world'}!`,
  node: process.version,
});
