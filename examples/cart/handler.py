"""A shopping cart per session: the seed's example, as written.

    nimbus deploy examples/cart/handler.py --name cart --state
    nimbus invoke cart --session alice --data '{"item_id": "book"}'
    nimbus invoke cart --session alice --data '{"item_id": "pen"}'    # cart_size 2
    nimbus invoke cart --session bob --data '{"item_id": "mug"}'      # cart_size 1
    nimbus state get cart alice
"""


def handle(event, state):
    cart = state.get('cart') or []
    cart.append(event['item_id'])
    state.set('cart', cart, ttl=3600)
    count = state.incr('item_count')
    return {'cart_size': len(cart), 'total_items': count}
