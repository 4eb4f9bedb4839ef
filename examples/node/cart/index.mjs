// The seed's shopping cart, as an ES module: one cart per session.
//
//   nimbus deploy examples/node/cart --name cart-js --runtime nodejs20 --handler index.handle --state --session-affinity on
//   nimbus invoke cart-js --session alice --data '{"item_id": "book"}'
//   nimbus invoke cart-js --session alice --data '{"item_id": "pen"}'   # cart_size 2

export async function handle(event, state) {
  const cart = (await state.get('cart')) ?? [];
  cart.push(event.item_id);
  await state.set('cart', cart, 3600);
  const count = await state.incr('item_count');
  return { cart_size: cart.length, total_items: count };
}
