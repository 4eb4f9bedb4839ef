// A counter shared by every invocation of the function, whatever the session.
//
//   nimbus deploy examples/node/counter/index.js --name counter-js --runtime nodejs20 --handler index.handle --state
//   nimbus invoke counter-js                     # {"count": 1}
//   nimbus invoke counter-js --data '{"by": 5}'  # {"count": 6}
//
// `incr` is atomic on the platform: concurrent invocations never lose a count.

exports.handle = async (event, state) => ({
  count: await state.function().incr('count', event?.by ?? 1),
});
